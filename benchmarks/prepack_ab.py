"""What packing the weights into oneDNN's blocked layout gives our CPU inference.

With oneDNN running the fast engine's GEMMs (``sequencer.fast.gemm``), the weights are handed over in their own
(plain) layout at every call, and oneDNN reorders them as it needs; with packing on (``gemm.set_packing``,
``SEQUENCER_PACK_WEIGHTS=1``, what ``sequencer validate`` and ``predict`` do) each weight is packed once into the
layout oneDNN's inner product prefers and reused. This script times Sequencer2D-S inference with the fast
engine's GEMMs forced onto oneDNN, in one process, alternating step by step between plain and packed weights
(packed by the first packed step, outside the timing), and checks that the outputs are identical before and
after the timed steps.

    python benchmarks/prepack_ab.py [--batch-sizes 1 8] [--iters 20] [--threads 2] [--results FILE]
"""
import argparse
import json
import os
import statistics
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8])
    p.add_argument('--iters', type=int, default=20, help='timed steps of each variant per batch size')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--threads', type=int, default=2)
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
    gemm.set_backend('onednn')
    torch.manual_seed(0)
    model = sequencer.create_model('sequencer2d_s').eval()
    torch.nn.init.normal_(model.get_classifier().weight, std=0.02)   # a zero-initialised head would hide differences
    results = {'model': 'sequencer2d_s', 'threads': args.threads, 'iters': args.iters, 'warmup': args.warmup,
               'environment': environment(torch.device('cpu')),
               'mkl_enable_instructions': os.environ.get('MKL_ENABLE_INSTRUCTIONS'), 'runs': {}}
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        times = {False: [], True: []}
        with torch.no_grad():
            outs = {}
            for v in (False, True):
                gemm.set_packing(v)
                outs[v] = model(x)
            same = torch.equal(outs[False], outs[True])
            max_diff = (outs[False] - outs[True]).abs().max().item()
            for i in range(args.warmup + args.iters):
                for v in ((False, True) if i % 2 == 0 else (True, False)):
                    gemm.set_packing(v)
                    t0 = time.perf_counter()
                    model(x)
                    if i >= args.warmup:
                        times[v].append(time.perf_counter() - t0)
            gemm.set_packing(True)
            again = model(x)   # after every timed step: the cached packed weights still give the same outputs
            same = same and torch.equal(outs[False], again)
            max_diff = max(max_diff, (outs[False] - again).abs().max().item())
        plain, pack = statistics.median(times[False]), statistics.median(times[True])
        run = {'median_ms_plain': round(plain * 1e3, 2), 'median_ms_packed': round(pack * 1e3, 2),
               'speedup_packed': round(plain / pack, 4),
               'throughput_speedup_packed': round(sum(times[False]) / sum(times[True]), 4),
               'outputs_identical': same, 'max_abs_difference': max_diff, 'packed_weights': gemm.packed_count(),
               'step_s_plain': times[False], 'step_s_packed': times[True]}
        results['runs'][f'b{batch}'] = run
        print(f"batch {batch}: plain {run['median_ms_plain']} ms, packed {run['median_ms_packed']} ms (median): "
              f"packed {run['speedup_packed']}x ({run['throughput_speedup_packed']}x by total time); outputs "
              f"{'identical' if same else f'differ by {max_diff:.2e}'}; {gemm.packed_count()} packed weights",
              flush=True)
    if args.results:
        write_text(args.results, json.dumps(results, indent=1))
        print(f"results: {args.results}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
