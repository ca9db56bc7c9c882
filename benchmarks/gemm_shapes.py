"""What limits a CPU training step: the fast engine's GEMMs on MKL and oneDNN, against a large GEMM's speed.

A training step of Sequencer2D-S on CPU is mostly float32 GEMMs. This script records every GEMM the fast engine
hands to ``sequencer.fast.gemm`` during one training step ('auto' engine, zero_grad + forward + cross-entropy +
backward + SGD step, random inputs), with its kind (forward, input_grad, weight_grad) and its operands' shapes
and layouts. It then times each distinct GEMM on MKL (``torch.mm``) and on oneDNN (the engine's oneDNN ops,
weights unpacked), and a large square GEMM on both as this processor's reference speed, and times the whole step.
It prints, per GEMM and per kind, the milliseconds one step spends on each backend and the speed reached, and
what share of the step these GEMMs take. Forward GEMMs with a bias or a residual are timed as plain products (the
add is a post-op). The recurrent products inside the compiled recurrence (a few hundred small GEMMs per step,
on MKL) are not recorded: they are part of the rest of the step.

    python benchmarks/gemm_shapes.py [--batch-size 8] [--threads 2] [--repeats 5] [--img-size 224]
        [--results FILE]
"""
import argparse
import json
import statistics
import sys
import time


def _best(fn, repeats: int) -> float:
    """The best of ``repeats`` timed calls of ``fn`` (after one untimed call), in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _timed(fn) -> float:
    """Seconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='sequencer2d_s')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--repeats', type=int, default=5, help='timed calls per GEMM and backend (the best counts)')
    p.add_argument('--steps', type=int, default=3, help='timed training steps (the median counts)')
    p.add_argument('--reference-size', type=int, default=2048, help='n of the n x n x n reference GEMM')
    p.add_argument('--results', help='write the figures to this JSON file')
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    import sequencer
    from sequencer.analysis.benchmark import environment
    from sequencer.engine.io import write_text
    from sequencer.fast import gemm

    if not gemm.available():
        print('gemm_shapes.py: this PyTorch build has no oneDNN inner product', file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = sequencer.create_model(args.model).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    target = torch.randint(0, model.num_classes, (args.batch_size,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        opt.step()

    step()   # the 'auto' choices are made (or read from the cache) here
    step_s = statistics.median(_timed(step) for _ in range(args.steps))

    # one more step with the gemm module's entry points wrapped: (kind, A, B) of every GEMM, A and B kept as
    # tensors of the same shapes and strides
    seen = {}

    def record(kind, a, b):
        key = (kind, tuple(a.shape), tuple(a.stride()), tuple(b.shape), tuple(b.stride()))
        seen[key] = seen.get(key, 0) + 1

    wrapped = {
        'mm': lambda orig: lambda a, b, kind, pack=False: (record(kind, a, b), orig(a, b, kind, pack))[1],
        'mm_into': lambda orig: lambda out, a, b, pack=False: (record('forward', a, b), orig(out, a, b, pack))[1],
        'addmm': lambda orig: lambda bias, a, b, pack=False: (record('forward', a, b), orig(bias, a, b, pack))[1],
        'add_mm': lambda orig: lambda c, a, b, bias=None, pack=False: (record('forward', a, b),
                                                                       orig(c, a, b, bias, pack))[1],
    }
    # Linear layers (the head, the patch GEMMs) go through gemm's own autograd Function while recording, as they
    # do whenever oneDNN runs one of their kinds: the same products, each seen with its kind
    wrapped['linear'] = lambda orig: lambda x, weight, bias=None: gemm._Linear.apply(x, weight, bias,
                                                                                     torch.is_grad_enabled())
    originals = {name: getattr(gemm, name) for name in wrapped}
    try:
        for name, wrap in wrapped.items():
            setattr(gemm, name, wrap(originals[name]))
        step()
    finally:
        for name, fn in originals.items():
            setattr(gemm, name, fn)

    def operand(shape, stride):
        base = torch.randn(max(1, sum((n - 1) * s for n, s in zip(shape, stride)) + 1))
        return base.as_strided(shape, stride)

    rows, totals = [], {}
    for (kind, ashape, astride, bshape, bstride), count in sorted(seen.items(), key=lambda kv: kv[0][0]):
        a, b = operand(ashape, astride), operand(bshape, bstride)
        M, K, N = ashape[0], ashape[1], bshape[1]
        flop = 2 * M * K * N
        t = {'mkl': _best(lambda: torch.mm(a, b), args.repeats),
             'onednn': _best(lambda: gemm._ONEDNN[kind](a, b), args.repeats)}
        rows.append({'kind': kind, 'M': M, 'K': K, 'N': N, 'per_step': count,
                     'a_transposed': astride[0] == 1 and M > 1, 'b_transposed': bstride[0] == 1 and K > 1,
                     **{f'ms_{n}': round(v * 1e3, 3) for n, v in t.items()},
                     **{f'gflops_{n}': round(flop / v / 1e9, 1) for n, v in t.items()}})
        tot = totals.setdefault(kind, {'mkl': 0.0, 'onednn': 0.0, 'best': 0.0, 'gflop': 0.0})
        for n, v in t.items():
            tot[n] += v * count
        tot['best'] += min(t.values()) * count
        tot['gflop'] += flop * count / 1e9

    n = args.reference_size
    ra, rw = torch.randn(n, n), torch.randn(n, n)   # x @ W^T, as a forward GEMM
    reference = {'mkl': 2 * n ** 3 / _best(lambda: torch.mm(ra, rw.t()), args.repeats) / 1e9,
                 'onednn': 2 * n ** 3 / _best(lambda: gemm._ONEDNN['forward'](ra, rw.t()), args.repeats) / 1e9}
    chosen = {k: gemm.backend(k) for k in gemm.KINDS}
    on_chosen = sum(t[chosen[k]] for k, t in totals.items())
    gflop = sum(t['gflop'] for t in totals.values())
    summary = {
        'step_s': round(step_s, 4),
        'gemm_gflop_per_step': round(gflop, 2),
        'gemm_s_per_step': {b: round(sum(t[b] for t in totals.values()), 4) for b in ('mkl', 'onednn', 'best')},
        'gemm_s_per_step_chosen': round(on_chosen, 4),
        'gemm_share_of_step_chosen': round(on_chosen / step_s, 3),
        'gemm_gflops_chosen': round(gflop / on_chosen, 1),
        'reference_gflops': {k: round(v, 1) for k, v in reference.items()},
        'gemm_speed_vs_reference': round(gflop / on_chosen / max(reference.values()), 3),
        'chosen': chosen,
        'per_kind': {k: {m: round(v, 4) for m, v in t.items()} for k, t in totals.items()},
    }

    print(f"{'kind':12s} {'M x K x N':>18s} {'/step':>5s} {'MKL ms':>8s} {'GF/s':>6s} {'oneDNN ms':>10s} {'GF/s':>6s}")
    for r in rows:
        print(f"{r['kind']:12s} {r['M']:>6d}x{r['K']:>5d}x{r['N']:>5d} {r['per_step']:>5d} {r['ms_mkl']:>8.2f} "
              f"{r['gflops_mkl']:>6.0f} {r['ms_onednn']:>10.2f} {r['gflops_onednn']:>6.0f}")
    for k, t in totals.items():
        print(f"{k}: {t['mkl'] * 1e3:.0f} ms on MKL, {t['onednn'] * 1e3:.0f} ms on oneDNN, "
              f"{t['best'] * 1e3:.0f} ms taking the faster per GEMM (chosen: {chosen[k]})")
    print(f"step {step_s * 1e3:.0f} ms (median of {args.steps}); its recorded GEMMs {gflop:.0f} GFLOP, "
          f"{on_chosen * 1e3:.0f} ms on the chosen backends ({summary['gemm_share_of_step_chosen']:.0%} of the "
          f"step) at {summary['gemm_gflops_chosen']:.0f} GFLOP/s; a {n}^3 GEMM runs at "
          f"{reference['mkl']:.0f} GFLOP/s on MKL, {reference['onednn']:.0f} on oneDNN "
          f"({summary['gemm_speed_vs_reference']:.0%} of the faster)")
    if args.results:
        results = {'model': args.model, 'batch_size': args.batch_size, 'img_size': args.img_size,
                   'threads': args.threads, 'repeats': args.repeats, 'environment': environment(torch.device('cpu')),
                   'summary': summary, 'gemms': rows}
        write_text(args.results, json.dumps(results, indent=1))
        print(f"results: {args.results}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
