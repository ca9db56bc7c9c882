"""What packing the weights into oneDNN's blocked layout gives our CPU inference, and whether it beats MKL.

With oneDNN running the fast engine's GEMMs (``sequencer.fast.gemm``), the weights are handed over in their own
(plain) layout at every call, and oneDNN reorders them as it needs; with packing on (``gemm.set_packing``,
``SEQUENCER_PACK_WEIGHTS=1``, what ``sequencer validate`` and ``predict`` do) each weight is packed once into the
layout oneDNN's inner product prefers and reused. This script times Sequencer2D-S inference (the fused engine)
in one process, alternating step by step (the order rotating) between three variants: the GEMMs on MKL, on
oneDNN with plain weights, and on oneDNN with packed weights (packed by a first step, outside the timing). It
checks that packed and plain oneDNN give identical outputs before and after the timed steps, and records what
'auto' chooses for inference with packing on (the 'packed_forward' measurement, made in a fresh cache).

    python benchmarks/prepack_ab.py [--batch-sizes 1 8] [--iters 20] [--threads 2] [--img-size 224]
        [--results FILE]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8])
    p.add_argument('--iters', type=int, default=20, help='timed steps of each variant per batch size')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--results', help='write the figures to this JSON file')
    args = p.parse_args()

    import torch

    import sequencer
    from sequencer.analysis.benchmark import environment
    from sequencer.engine.io import write_text
    from sequencer.fast import gemm

    if not gemm.available():
        print('prepack_ab.py: this PyTorch build has no oneDNN inner product', file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # the fused engine throughout: only the GEMMs' backend and weights change between the variants
    model = sequencer.create_model('sequencer2d_s', rnn_engine='fused').eval()
    torch.nn.init.normal_(model.get_classifier().weight, std=0.02)   # a zero-initialised head would hide differences
    results = {'model': 'sequencer2d_s', 'img_size': args.img_size, 'threads': args.threads, 'iters': args.iters,
               'warmup': args.warmup,
               'environment': environment(torch.device('cpu')),
               'mkl_enable_instructions': os.environ.get('MKL_ENABLE_INSTRUCTIONS'), 'runs': {}}
    saved = {k: os.environ.get(k) for k in ('SEQUENCER_CACHE_DIR', 'SEQUENCER_AUTOTUNE')}
    with tempfile.TemporaryDirectory() as cache:   # what 'auto' picks here, measured afresh
        os.environ.update({'SEQUENCER_CACHE_DIR': cache, 'SEQUENCER_AUTOTUNE': '1'})
        results['auto_choice'] = {kind: gemm.backend(kind) for kind in ('forward', gemm.PACKED)}
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.update({k: v})
    print(f"auto's choice here: forward {results['auto_choice']['forward']}, "
          f"{gemm.PACKED} {results['auto_choice'][gemm.PACKED]}", flush=True)
    variants = {'mkl': ('mkl', False), 'onednn': ('onednn', False), 'onednn_packed': ('onednn', True)}

    def use(name):
        gemm.set_backend(variants[name][0])
        gemm.set_packing(variants[name][1])

    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
        times = {v: [] for v in variants}
        with torch.no_grad():
            outs = {}
            for v in variants:
                use(v)
                outs[v] = model(x)
            names = list(variants)
            for i in range(args.warmup + args.iters):
                for v in names[i % 3:] + names[:i % 3]:
                    use(v)
                    t0 = time.perf_counter()
                    model(x)
                    if i >= args.warmup:
                        times[v].append(time.perf_counter() - t0)
            use('onednn_packed')
            again = model(x)   # after every timed step: the cached packed weights still give the same outputs
        same = torch.equal(outs['onednn'], outs['onednn_packed']) and torch.equal(outs['onednn'], again)
        rel_mkl = ((outs['mkl'] - outs['onednn_packed']).abs().max() / outs['mkl'].abs().max()).item()
        med = {v: statistics.median(ts) for v, ts in times.items()}
        run = {**{f'median_ms_{v}': round(t * 1e3, 2) for v, t in med.items()},
               'speedup_packed_over_plain': round(med['onednn'] / med['onednn_packed'], 4),
               'speedup_packed_over_mkl': round(med['mkl'] / med['onednn_packed'], 4),
               'throughput_speedup_packed_over_plain': round(sum(times['onednn']) / sum(times['onednn_packed']), 4),
               'throughput_speedup_packed_over_mkl': round(sum(times['mkl']) / sum(times['onednn_packed']), 4),
               'packed_outputs_identical_to_plain': same, 'max_relative_difference_to_mkl': rel_mkl,
               'packed_weights': gemm.packed_count(), **{f'step_s_{v}': ts for v, ts in times.items()}}
        results['runs'][f'b{batch}'] = run
        print(f"batch {batch}, median ms: MKL {run['median_ms_mkl']}, oneDNN {run['median_ms_onednn']}, "
              f"oneDNN packed {run['median_ms_onednn_packed']}: packed {run['speedup_packed_over_plain']}x plain "
              f"oneDNN, {run['speedup_packed_over_mkl']}x MKL; packed outputs "
              f"{'identical to plain' if same else 'DIFFER from plain'}, {rel_mkl:.1e} from MKL's", flush=True)
    gemm.set_backend(None)
    gemm.set_packing(None)
    if args.results:
        write_text(args.results, json.dumps(results, indent=1))
        print(f"results: {args.results}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
