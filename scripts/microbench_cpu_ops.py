"""Op-level CPU microbenchmarks of the fused paths at Sequencer2D-S shapes (batch 8, 224 px).

Not figures of record (those come from ``sequencer benchmark``): these time single operations, median of
``--iters`` calls, to see what one change does to its own op. ``--cold`` reads a 128 MB buffer between
calls (reads: no dirty lines left to write back during the timed call) so that operands come from memory.

    python scripts/microbench_cpu_ops.py [--cases lstm,norm,stem] [--iters 30] [--cold] [--num-threads 2]

Cases:
  lstm  the compiled recurrence kernel of one BiLSTM2D (stage 3: 16x16 tokens, hidden 96; stage 1: 32x32,
        hidden 48): forward with saved activations, backward (recurrent GEMMs, cell gradients, W_hh and bias
        gradients), and the recurrent GEMMs of all steps alone
  norm  a block's pre-norm with its residual: native LayerNorm + a separate add of the branch bias, against
        the kernel that writes both in one pass
  stem  the patch embedding, forward + weight gradient: timm's PatchEmbed (convolution + NHWC copy) against
        the GEMM over gathered patches
  down  the 2x2 downsampling between stages 1 and 2 (a GEMM over gathered patches), forward + backward
"""
import argparse
import statistics
import time

import torch


def timed(fn, iters, cold, prepare=None):
    flush = torch.ones(32 * 1024 * 1024) if cold else None
    times = []
    for i in range(iters + 3):
        if prepare is not None:
            prepare()
        if flush is not None:
            flush.sum()
        t0 = time.perf_counter()
        fn()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_lstm(iters, cold):
    ops = torch.ops.sequencer_lstm2d
    for B, H, W, h in ((8, 16, 16, 96), (8, 32, 32, 48)):
        D, G, kinds = 4, 4 * h, [2, 3, 0, 1]
        BHW = B * H * W
        torch.manual_seed(0)
        xp0 = torch.randn(BHW, D * G) * 0.5
        xp = xp0.clone()
        bias = torch.randn(D * G) * 0.1
        whh = torch.randn(D, G, h) * 0.1
        whh_t = whh.transpose(1, 2).contiguous()
        y = torch.empty(BHW, D * h)
        state = {}

        def forward():
            state['cs'] = ops.forward(xp, bias, whh_t, B, H, W, kinds, h, y, True)

        t_fwd = timed(forward, iters, cold, prepare=lambda: xp.copy_(xp0))
        gates = xp.clone()
        gy = torch.randn(BHW, D * h)
        dwhh, db = torch.empty_like(whh), torch.empty(D * G)
        t_bwd = timed(lambda: ops.backward(gy, xp, state['cs'], whh, y, B, H, W, kinds, h, dwhh, db), iters, cold,
                      prepare=lambda: xp.copy_(gates))
        hs, rec = torch.randn(D, B * W, h), torch.empty(D, B * W, G)
        t_mm = timed(lambda: [torch.bmm(hs, whh_t, out=rec) for _ in range(H)], iters, cold)
        print(f'lstm  {H}x{W} tokens, hidden {h}: forward {t_fwd:.2f} ms, backward {t_bwd:.2f} ms '
              f'(the forward recurrent GEMMs alone {t_mm:.2f} ms)')


def bench_norm(iters, cold):
    op = torch.ops.sequencer_norm.layer_norm_residual_bias
    for M, C in ((2048, 384), (8192, 192)):
        torch.manual_seed(0)
        x = torch.randn(M, C) * 2 + 0.5
        w, b, rb = torch.randn(C), torch.randn(C), torch.randn(C)
        t_plain = timed(lambda: (torch.native_layer_norm(x, (C,), w, b, 1e-6), torch.add(x, rb)), iters, cold)
        t_fused = timed(lambda: op(x, w, b, 1e-6, rb), iters, cold)
        print(f'norm  {M}x{C}: LayerNorm + add {t_plain:.3f} ms, one kernel pass {t_fused:.3f} ms')


def bench_stem(iters, cold):
    from sequencer.layers.blocks import patch_linear
    from sequencer.models import create_model
    stem = create_model('sequencer2d_s').stem
    x = torch.randn(8, 3, 224, 224)
    g = torch.randn(8, 32, 32, 192)
    t_conv = timed(lambda: stem(x).contiguous().backward(g), iters, cold)
    t_gemm = timed(lambda: patch_linear(x, stem.proj, channels_first=True).backward(g), iters, cold)
    print(f'stem  8x3x224x224, forward + weight gradient: PatchEmbed {t_conv:.2f} ms, GEMM over patches '
          f'{t_gemm:.2f} ms')


def bench_down(iters, cold):
    from sequencer.layers import Downsample2D
    down = Downsample2D(192, 384, 2)
    x = torch.randn(8, 32, 32, 192, requires_grad=True)
    g = torch.randn(8, 16, 16, 384)
    t = timed(lambda: down(x).backward(g), iters, cold)
    print(f'down  8x32x32x192 -> 8x16x16x384 (2x2 patches), forward + backward: {t:.2f} ms')


CASES = {'lstm': bench_lstm, 'norm': bench_norm, 'stem': bench_stem, 'down': bench_down}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--cases', default='lstm,norm,stem,down', help='comma-separated: ' + ', '.join(CASES))
    p.add_argument('--iters', type=int, default=30)
    p.add_argument('--cold', action='store_true', help='read a 128 MB buffer between calls')
    p.add_argument('--num-threads', type=int, default=2)
    args = p.parse_args()
    cases = [c.strip() for c in args.cases.split(',') if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"--cases: unknown {', '.join(unknown)} (choose from {', '.join(CASES)})")
    torch.set_num_threads(args.num_threads)
    from sequencer.layers import cpu_kernel
    if not cpu_kernel.available():
        p.exit(2, f'microbench_cpu_ops.py: error: the CPU kernel is not available ({cpu_kernel.error()})\n')
    print(f'torch {torch.__version__}, {args.num_threads} threads, median of {args.iters} calls, '
          f"{'cold' if args.cold else 'hot'} caches")
    for c in cases:
        CASES[c](args.iters, args.cold)


if __name__ == '__main__':
    main()
