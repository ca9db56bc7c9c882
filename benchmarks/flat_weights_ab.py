"""What reading the recurrence's stacked weights where they live gives our CPU inference.

``set_engine`` makes the LSTM parameters of each fast BiLSTM2D views of one stacked buffer per kind
(``sequencer.fast.lstm2d.flatten_weights``), so that inference reads the stacked ``W_ih`` and biases without
copying them; a layer whose parameters were replaced stacks copies at every call instead. This script times
Sequencer2D-S inference (the fused engine, the library's defaults otherwise) in one process, alternating step by
step between the two (the buffers forgotten for 'stacked'), checks that both give identical outputs, and writes
the medians.

    python benchmarks/flat_weights_ab.py [--batch-sizes 1 8] [--iters 40] [--threads 2] [--results FILE]
"""
import argparse
import json
import statistics
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8])
    p.add_argument('--iters', type=int, default=40, help='timed steps of each variant per batch size')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--results', help='write the figures to this JSON file')
    args = p.parse_args()

    import torch

    import sequencer
    from sequencer.analysis.benchmark import environment
    from sequencer.engine.io import write_text
    from sequencer.fast import lstm2d

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = sequencer.create_model('sequencer2d_s', rnn_engine='fused').eval()
    torch.nn.init.normal_(model.get_classifier().weight, std=0.02)   # a zero-initialised head would hide differences
    flat = dict(lstm2d._flat.items())
    if not flat:
        print('flat_weights_ab.py: no layer was flattened (not a CPU float32 model?)')
        return 1

    def use(name):
        lstm2d._flat.clear()
        if name == 'flat':
            lstm2d._flat.update(flat)

    results = {'model': 'sequencer2d_s', 'img_size': args.img_size, 'threads': args.threads, 'iters': args.iters,
               'warmup': args.warmup, 'environment': environment(torch.device('cpu')), 'runs': {}}
    variants = ('flat', 'stacked')
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
        times = {v: [] for v in variants}
        with torch.inference_mode():
            outs = {}
            for v in variants:
                use(v)
                outs[v] = model(x)
            identical = bool(torch.equal(outs['flat'], outs['stacked']))
            for i in range(args.warmup + args.iters):
                for v in (variants if i % 2 == 0 else variants[::-1]):
                    use(v)
                    t0 = time.perf_counter()
                    model(x)
                    if i >= args.warmup:
                        times[v].append(time.perf_counter() - t0)
        use('flat')
        med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        run = {'median_ms': med, 'min_ms': {v: min(t) * 1e3 for v, t in times.items()},
               'stacked_over_flat': med['stacked'] / med['flat'], 'outputs_identical': identical}
        results['runs'][f'b{batch}'] = run
        print(f"batch {batch}: flat {med['flat']:.2f} ms, stacked {med['stacked']:.2f} ms (median of {args.iters}); "
              f"stacked / flat {run['stacked_over_flat']:.3f}; outputs identical: {identical}", flush=True)
    if args.results:
        write_text(args.results, json.dumps(results, indent=1) + '\n')
        print(f"results: {args.results}")
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
