"""What glibc's default allocator costs a CPU training step, and what ``sequencer train``'s setting saves.

A training step allocates and frees the same large activations every step. With glibc's defaults, blocks above a
moving threshold (at most 32 MiB) are fresh ``mmap`` regions and freed memory at the top of the heap goes back to
the system, so every step faults its memory in again. ``sequencer.engine.malloc.keep_freed_memory`` (what
``sequencer train`` sets on CPU) serves every block from the heap and keeps freed memory there.

Each configuration runs in its own process (the allocator's settings and state are per process), rounds
alternating the settings; a process runs a few warm-up steps, then times training steps (forward, cross-entropy,
backward, SGD with momentum) and reads its page faults and kernel time per step:

* ``default``: glibc as it comes;
* ``threshold``: the mmap threshold fixed at its ceiling and a high trim threshold only (blocks above 32 MiB
  still mapped each time);
* ``tuned``: ``keep_freed_memory()``.

    python benchmarks/malloc_cost.py [--runs ours:32 timm:8 ours:8] [--settings default threshold tuned]
        [--rounds 2] [--steps 4] [--results FILE]
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

SETTINGS = ('default', 'threshold', 'tuned')


def _child(impl: str, batch: int, setting: str, threads: int, warmup: int, steps: int) -> dict:
    import ctypes
    import resource

    from sequencer.engine import malloc
    if setting == 'threshold':
        libc = ctypes.CDLL('libc.so.6')
        ok = (libc.mallopt(malloc.M_MMAP_THRESHOLD, malloc.MMAP_THRESHOLD_MAX) == 1
              and libc.mallopt(malloc.M_TRIM_THRESHOLD, malloc.TRIM_THRESHOLD) == 1)
    elif setting == 'tuned':
        ok = malloc.keep_freed_memory()
    else:
        ok = True
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if impl == 'timm':
        import timm
        model = timm.create_model('sequencer2d_s')
    else:
        import sequencer
        model = sequencer.create_model('sequencer2d_s')
    model.train()
    x = torch.randn(batch, 3, 224, 224)
    target = torch.randint(0, 1000, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()

    for _ in range(warmup):
        step()
    times, faults, kernel = [], [], []
    for _ in range(steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        times.append(t1 - t0)
        faults.append(r1.ru_minflt - r0.ru_minflt)
        kernel.append(r1.ru_stime - r0.ru_stime)
    return {'setting_applied': bool(ok), 'step_s': times, 'faults_per_step': faults, 'kernel_s_per_step': kernel,
            'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--runs', nargs='+', default=['ours:32', 'timm:8', 'ours:8'],
                   help="IMPL:BATCH, IMPL being 'ours' (Sequencer2D-S, default engine) or 'timm' (sequencer2d_s)")
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--rounds', type=int, default=2, help='processes per setting and run, alternating settings')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--steps', type=int, default=4, help='timed steps per process')
    p.add_argument('--settings', nargs='+', choices=SETTINGS, default=list(SETTINGS))
    p.add_argument('--results', help='write the figures to this JSON file')
    p.add_argument('--child', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        impl, batch, setting = args.child.split(':')
        print(json.dumps(_child(impl, int(batch), setting, args.threads, args.warmup, args.steps)))
        return 0

    import torch

    from sequencer.analysis.benchmark import environment
    from sequencer.engine.io import write_text
    results = {'model': 'sequencer2d_s', 'threads': args.threads, 'warmup': args.warmup, 'steps': args.steps,
               'rounds': args.rounds, 'environment': environment(torch.device('cpu')), 'runs': {}}
    for run in args.runs:
        impl, batch = run.split(':')
        settings = tuple(args.settings)
        per = {s: {'step_s': [], 'faults_per_step': [], 'kernel_s_per_step': [], 'peak_rss_mb': []} for s in settings}
        for r in range(args.rounds):
            for setting in (settings if r % 2 == 0 else settings[::-1]):
                proc = subprocess.run([sys.executable, __file__, '--child', f'{impl}:{batch}:{setting}',
                                       '--threads', str(args.threads), '--warmup', str(args.warmup),
                                       '--steps', str(args.steps)], capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr, file=sys.stderr)
                    return 1
                out = json.loads(proc.stdout.strip().splitlines()[-1])
                if not out['setting_applied']:
                    print(f"malloc_cost.py: {setting} could not be set (not glibc?)", file=sys.stderr)
                    return 1
                for k in ('step_s', 'faults_per_step', 'kernel_s_per_step'):
                    per[setting][k] += out[k]
                per[setting]['peak_rss_mb'].append(out['peak_rss_mb'])
                print(f"{impl} b{batch} {setting:9s} round {r + 1}: median step "
                      f"{statistics.median(out['step_s']):.3f} s, {statistics.median(out['faults_per_step']):.0f} "
                      f"faults, {statistics.median(out['kernel_s_per_step']):.3f} s kernel", flush=True)
        summary = {s: {'median_step_s': round(statistics.median(v['step_s']), 3),
                       'median_faults_per_step': int(statistics.median(v['faults_per_step'])),
                       'median_kernel_s_per_step': round(statistics.median(v['kernel_s_per_step']), 3),
                       'peak_rss_mb': max(v['peak_rss_mb'])} for s, v in per.items()}
        base = summary[settings[0]]['median_step_s']
        for s in settings:
            summary[s][f'speedup_vs_{settings[0]}'] = round(base / summary[s]['median_step_s'], 3)
        results['runs'][run] = {'summary': summary, 'raw': per}
        print(f"{impl} b{batch}: " + '; '.join(f"{s} {v['median_step_s']} s ({v[f'speedup_vs_{settings[0]}']}x)"
                                               for s, v in summary.items()), flush=True)
    if args.results:
        write_text(args.results, json.dumps(results, indent=1))
        print(f"results: {args.results}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
