"""What pre-packing the weights into oneDNN's blocked layout would give our CPU inference.

With oneDNN running the fast engine's GEMMs (``sequencer.fast.gemm``), the weights are handed over in their own
(plain) layout at every call, and oneDNN reorders them as it needs. ``torch.ops.mkldnn._reorder_linear_weight``
packs a weight once, for a given number of rows, into the layout oneDNN's inner product prefers. This script
times Sequencer2D-S inference with the fast engine's forward GEMMs on oneDNN, in one process, alternating step
by step between the plain weights and weights packed once (a cache keyed by the weight's storage, shape and
version, filled by the first packed step, outside the timing), and checks that the outputs are identical before
and after the timed steps.

The packing here is an experiment, patched into the running process: the library does not pack weights (a
cache of packed weights would have to notice every way a weight can change, and the gain measured on the
processors seen so far is within the noise; BENCHMARKS.md has the figures).

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
    from sequencer.fast import gemm, lstm2d

    if not gemm.available():
        print('prepack_ab.py: this PyTorch build has no oneDNN inner product', file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    gemm.set_backend('onednn')
    packed_on = {'value': False}
    cache = {}
    plain_mm, plain_add_mm = gemm._onednn_mm, gemm.add_mm

    def packed(w: torch.Tensor, rows: int) -> torch.Tensor:
        key = (w.data_ptr(), tuple(w.shape), w.stride(), w._version, rows)
        if key not in cache:   # the entry holds w: its memory cannot be reused by another tensor meanwhile
            cache[key] = (w, torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows))
        return cache[key][1]

    # the fused recurrence stacks its directions' input weights at every call (sequencer.fast.lstm2d): with
    # packing, the stacked weights are kept too, so that their packed copies are reused
    stacked_cache = {}
    plain_stacked = lstm2d._stacked_weights

    def stacked_weights(params, D, dtype):
        if not packed_on['value']:
            return plain_stacked(params, D, dtype)
        present = [p for p in params if p is not None]
        key = (tuple(id(p) for p in present), tuple(p._version for p in present), D, dtype)
        if key not in stacked_cache:
            stacked_cache[key] = (present, plain_stacked(params, D, dtype))
        return stacked_cache[key][1]

    def onednn_mm(a, b, bias=None):
        if not packed_on['value']:
            return plain_mm(a, b, bias)
        a = a if gemm._row_major(a) else a.contiguous()
        return torch.ops.mkldnn._linear_pointwise(a, packed(b.t(), a.shape[0]), bias, 'none', [], '')

    def add_mm(c, a, b, bias=None):
        if not (packed_on['value'] and gemm._routed('forward', a, b, c) and a.shape[0] > 0):
            return plain_add_mm(c, a, b, bias)
        a = a if gemm._row_major(a) else a.contiguous()
        return torch.ops.mkldnn._linear_pointwise.binary(a, c.contiguous(), packed(b.t(), a.shape[0]), bias, 'add')

    # the fast modules call these through their modules (gemm.add_mm, gemm._ONEDNN[kind], gemm._onednn_mm)
    gemm._onednn_mm = gemm._ONEDNN['forward'] = onednn_mm
    gemm.add_mm = add_mm
    lstm2d._stacked_weights = stacked_weights

    model = sequencer.create_model('sequencer2d_s').eval()
    results = {'model': 'sequencer2d_s', 'threads': args.threads, 'iters': args.iters, 'warmup': args.warmup,
               'environment': environment(torch.device('cpu')),
               'mkl_enable_instructions': os.environ.get('MKL_ENABLE_INSTRUCTIONS'), 'runs': {}}
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        times = {False: [], True: []}
        with torch.no_grad():
            outs = {}
            for v in (False, True):
                packed_on['value'] = v
                outs[v] = model(x)
            same = torch.equal(outs[False], outs[True])
            max_diff = (outs[False] - outs[True]).abs().max().item()
            for i in range(args.warmup + args.iters):
                for v in ((False, True) if i % 2 == 0 else (True, False)):
                    packed_on['value'] = v
                    t0 = time.perf_counter()
                    model(x)
                    if i >= args.warmup:
                        times[v].append(time.perf_counter() - t0)
            packed_on['value'] = True
            again = model(x)   # after every timed step: the cached packed weights still give the same outputs
            same = same and torch.equal(outs[False], again)
            max_diff = max(max_diff, (outs[False] - again).abs().max().item())
        plain, pack = statistics.median(times[False]), statistics.median(times[True])
        run = {'median_ms_plain': round(plain * 1e3, 2), 'median_ms_packed': round(pack * 1e3, 2),
               'speedup_packed': round(plain / pack, 4),
               'throughput_speedup_packed': round(sum(times[False]) / sum(times[True]), 4),
               'outputs_identical': same, 'max_abs_difference': max_diff, 'packed_weights': len(cache),
               'step_s_plain': times[False], 'step_s_packed': times[True]}
        results['runs'][f'b{batch}'] = run
        print(f"batch {batch}: plain {run['median_ms_plain']} ms, packed {run['median_ms_packed']} ms (median): "
              f"packed {run['speedup_packed']}x ({run['throughput_speedup_packed']}x by total time); outputs "
              f"{'identical' if same else f'differ by {max_diff:.2e}'}; {len(cache)} packed weights", flush=True)
    if args.results:
        write_text(args.results, json.dumps(results, indent=1))
        print(f"results: {args.results}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
