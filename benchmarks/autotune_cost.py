"""What the 'auto' engine's measuring costs the first time, on CPU.

With an empty cache, the first step of Sequencer2D-S in each mode times, per BiLSTM2D shape, the fused engine
against nn.LSTM, and per GEMM kind MKL against oneDNN (``sequencer.fast.autotune``, ``sequencer.fast.gemm``). This
script runs, in one process with a fresh cache directory, a few steps per mode (inference, then training) and
reports the first step, the later steps' median and their difference: the one-time cost of measuring (plus the
first-call costs every model has, which the same run with ``SEQUENCER_AUTOTUNE=0`` shows, in a second process).
A third process reads the cache the first one wrote and must measure nothing.

    python benchmarks/autotune_cost.py [--batch-size 8] [--threads 2] [--results FILE]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _one_process(batch: int, threads: int, steps: int) -> dict:
    import torch

    import sequencer
    from sequencer.fast import autotune, gemm

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = sequencer.create_model('sequencer2d_s')
    x = torch.randn(batch, 3, 224, 224)
    out = {}
    for mode in ('infer', 'train'):
        model.train(mode == 'train')
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            if mode == 'train':
                model(x).logsumexp(-1).mean().backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    model(x)
            times.append(time.perf_counter() - t0)
        later = statistics.median(times[1:])
        out[mode] = {'first_s': round(times[0], 3), 'later_median_s': round(later, 3),
                     'first_minus_later_s': round(times[0] - later, 3)}
    out['engine'] = autotune.describe(model)
    out['gemm'] = gemm.describe()
    out['cached_choices'] = len(autotune.choices())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--steps', type=int, default=4, help='steps per mode (the first, then the later ones)')
    p.add_argument('--results', help='write the figures to this JSON file')
    p.add_argument('--child', choices=('measure', 'off', 'cached'), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_one_process(args.batch_size, args.threads, args.steps)))
        return 0

    import torch

    from sequencer.analysis.benchmark import environment
    from sequencer.engine.io import write_text
    results = {'model': 'sequencer2d_s', 'batch_size': args.batch_size, 'threads': args.threads,
               'steps_per_mode': args.steps, 'environment': environment(torch.device('cpu')), 'runs': {}}
    with tempfile.TemporaryDirectory() as cache:
        for child, env in (('measure', {'SEQUENCER_AUTOTUNE': '1'}), ('off', {'SEQUENCER_AUTOTUNE': '0'}),
                           ('cached', {'SEQUENCER_AUTOTUNE': '1'})):
            print(f"== {child}: {'empty cache' if child == 'measure' else env}", flush=True)
            proc = subprocess.run([sys.executable, __file__, '--child', child, '--batch-size', str(args.batch_size),
                                   '--threads', str(args.threads), '--steps', str(args.steps)],
                                  env=dict(os.environ, SEQUENCER_CACHE_DIR=cache, **env),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            results['runs'][child] = run
            for mode in ('infer', 'train'):
                r = run[mode]
                print(f"   {mode}: first step {r['first_s']} s, later steps {r['later_median_s']} s (median)")
            print(f"   engine: {run['engine']}; GEMMs: {run['gemm']}")
    m, off = results['runs']['measure'], results['runs']['off']
    results['measuring_cost_s'] = {mode: round(m[mode]['first_minus_later_s'] - off[mode]['first_minus_later_s'], 2)
                                   for mode in ('infer', 'train')}
    print(f"measuring cost (first-step excess over the unmeasured process): {results['measuring_cost_s']}")
    if args.results:
        write_text(args.results, json.dumps(results, indent=1))
        print(f"results: {args.results}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
