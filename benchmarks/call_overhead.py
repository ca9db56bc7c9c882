"""What one Sequencer block costs per call when its operators cost almost nothing: the Python and dispatch work
around them, which at batch 1 is a few percent of an inference.

The block is Sequencer2D's (LayerNorm, BiLSTM2D, LayerNorm, MLP) at a 2x2 token grid with 8 channels and hidden
size 2, in inference (``torch.no_grad``), one thread. Timed in one process, round after round, each variant in
turn (the best of 3 repeats of ``--number`` calls per round):

* ``timm``: timm's ``Sequencer2dBlock`` (native ``nn.LSTM``);
* ``native``: ours on the native engine (the paper's model: the same layers as timm's);
* ``fused``: ours on the fused engine (the library's default path on CPU);
* ``fused, Function.apply``: the same with the fused functions applied through ``torch.autograd.Function.apply``
  even where nothing can be recorded (what ``sequencer.fast.runtime.apply`` avoids).

All four are checked to give the same output (within float32 rounding) before timing.

    python benchmarks/call_overhead.py [--rounds 12] [--number 300] [--results FILE]
"""
import argparse
import functools
import json
import statistics
import timeit


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--rounds', type=int, default=12)
    p.add_argument('--number', type=int, default=300, help='calls per repeat')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--results', help='write the figures to this JSON file')
    args = p.parse_args()

    import timm.models.sequencer as timm_sequencer
    import torch

    import sequencer
    from sequencer.analysis.benchmark import environment
    from sequencer.engine.io import write_text
    from sequencer.fast import gemm, lstm2d, ops
    from sequencer.models.blocks import RNN2D, SequencerBlock

    torch.set_num_threads(args.threads)
    dim, hidden = 8, 2
    torch.manual_seed(0)
    ref = timm_sequencer.Sequencer2dBlock(dim, hidden).eval()
    with torch.no_grad():
        for t in ref.parameters():
            t.normal_(0, 0.3)

    def ours(engine):
        block = SequencerBlock(dim, functools.partial(RNN2D, hidden_size=hidden)).eval()
        block.load_state_dict(ref.state_dict())   # the same layer names as timm's block
        return sequencer.set_engine(block, engine)

    native, fused = ours('native'), ours('fused')
    x = torch.randn(1, 2, 2, dim)
    with_apply = {m: m.apply for m in (lstm2d, ops, gemm)}

    def function_apply(on):
        for module, own in with_apply.items():
            module.apply = (lambda fn, *a: fn.apply(*a)) if on else own

    variants = {'timm': (ref, False), 'native': (native, False), 'fused': (fused, False),
                'fused, Function.apply': (fused, True)}
    with torch.no_grad():
        want = ref(x)
        for name, (block, on) in variants.items():
            function_apply(on)
            torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-5, msg=name)
    function_apply(False)

    times = {name: [] for name in variants}
    with torch.no_grad():
        for r in range(args.rounds):
            for name, (block, on) in variants.items():
                function_apply(on)
                best = min(timeit.repeat(lambda: block(x), number=args.number, repeat=3)) / args.number
                times[name].append(best * 1e6)
            function_apply(False)
            print(f"round {r + 1}/{args.rounds}: " + ', '.join(f"{n} {t[-1]:.0f} us" for n, t in times.items()),
                  flush=True)
    summary = {name: {'median_us': statistics.median(t), 'min_us': min(t)} for name, t in times.items()}
    for name, s in summary.items():
        print(f"{name:24s} median {s['median_us']:6.1f} us   min {s['min_us']:6.1f} us "
              f"  ({s['median_us'] / summary['timm']['median_us']:.3f} of timm's median)")
    if args.results:
        out = {'what': 'one Sequencer block per call at 2x2 tokens, 8 channels, hidden 2, inference, '
                       f'{args.threads} thread(s); best of 3 repeats of {args.number} calls per round',
               'environment': environment(torch.device('cpu')), 'rounds': args.rounds, 'summary': summary,
               'per_round_us': times}
        write_text(args.results, json.dumps(out, indent=1) + '\n')
        print(f"wrote {args.results}")
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
