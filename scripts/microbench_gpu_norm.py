"""GPU microbenchmark of the Triton pre-norm kernels (``sequencer/layers/triton_norm.py``) at Sequencer2D-S's
shapes: the forward, the backward in its default launch configuration and in every alternative of a grid
(programs, rows per loop step, warps), and the plain path they replace (cast to float32, LayerNorm, cast
back; autograd's backward of the same) for reference.

Not figures of record (those come from ``sequencer benchmark``): each figure is the median of ``--iters``
calls timed with CUDA events. It reports the bandwidth each kernel reaches (bytes it must read and write)
and what the fastest backward configuration would save per training step of Sequencer2D-S (36 pre-norms).

    python scripts/microbench_gpu_norm.py [--batch-size 256] [--iters 20] [--json FILE]
    TRITON_INTERPRET=1 python scripts/microbench_gpu_norm.py --smoke     # tiny shapes on the CPU: runs the code

Shapes (224 px, bf16 residual stream): stage 1, 32x32 tokens, 192 channels (8 pre-norms per step); stages
2-4, 16x16 tokens, 384 channels (28 pre-norms).
"""
import argparse
import functools
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

from microbench_gpu_recurrence import timed as _timed   # this script's folder is on the path

# name: (tokens per image, channels, pre-norms per training step of Sequencer2D-S)
SHAPES = {'stage1': (32 * 32, 192, 8), 'stage2-4': (16 * 16, 384, 28)}
MAX_PROGRAMS = (1024, 2048, 4096, 8192, 16384, 65536)
WARPS = (4, 8)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--json', default=None, help='write the results to this JSON file')
    p.add_argument('--smoke', action='store_true',
                   help="tiny shapes and a small grid on the CPU through Triton's interpreter (TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    from sequencer.layers import triton_norm as tn
    if args.smoke:
        if os.environ.get('TRITON_INTERPRET') != '1':
            sys.exit('microbench_gpu_norm.py: --smoke runs through the interpreter: set TRITON_INTERPRET=1')
        dev, shapes, iters = torch.device('cpu'), {'tiny': (6, 24, 1)}, 1
        grid = list(itertools.product((1, 4), (None, 2), (4,)))
        B = 2
    else:
        if not torch.cuda.is_available():
            sys.exit('microbench_gpu_norm.py: needs a CUDA device (or --smoke)')
        dev, shapes, iters = torch.device('cuda'), SHAPES, args.iters
        B = args.batch_size
    timed = functools.partial(_timed, iters=iters, cuda=dev.type == 'cuda')
    dt = torch.bfloat16
    results, saving = [], 0.0
    for stage, (tokens, C, count) in shapes.items():
        M = B * tokens
        x = torch.randn(M, C, device=dev).to(dt)
        w, b = torch.randn(C, device=dev), torch.randn(C, device=dev)
        g, g_res = torch.randn(M, C, device=dev).to(dt), torch.randn(M, C, device=dev).to(dt)
        out, stats = tn.norm_forward(x, w, b, 1e-6, dt)
        _, default_m, default_warps = tn._blocks(C)
        gb = M * C * 1e-9 / 1e-3   # GB per ms at one byte per element
        row = dict(stage=stage, rows=M, channels=C, per_step=count, default_block_m=default_m,
                   default_warps=default_warps)
        row['forward_ms'] = timed(lambda: tn.norm_forward(x, w, b, 1e-6, dt))
        row['backward_default_ms'] = timed(lambda: tn.norm_backward(g, x, stats, w, g_res))

        # the plain path under autocast: bf16 -> float32, LayerNorm, -> bf16; backward through autograd + residual
        xf = x.detach().requires_grad_()
        wf, bf = w.detach().requires_grad_(), b.detach().requires_grad_()

        def plain_forward():
            return F.layer_norm(xf.float(), (C,), wf, bf, 1e-6).to(dt)
        y = plain_forward()
        row['plain_forward_ms'] = timed(plain_forward)
        row['plain_backward_ms'] = timed(
            lambda: torch.autograd.grad(y, (xf, wf, bf), g, retain_graph=True)[0] + g_res)
        row['forward_GBps'] = 4 * gb / row['forward_ms']        # read x, write the output (2 + 2 bytes)
        row['backward_GBps'] = 8 * gb / row['backward_default_ms']   # read x, g, g_res; write dx

        configs = []
        block_ms = sorted({max(1, default_m // 2), default_m, default_m * 2, default_m * 4}) if not args.smoke \
            else None
        sweep = (itertools.product(MAX_PROGRAMS, block_ms, WARPS) if not args.smoke else grid)
        for max_programs, block_m, warps in sweep:
            ms = timed(lambda: tn.norm_backward(g, x, stats, w, g_res, max_programs=max_programs,
                                                block_m=block_m, num_warps=warps))
            configs.append(dict(max_programs=max_programs, block_m=block_m or default_m, num_warps=warps, ms=ms))
        best = min(configs, key=lambda c: c['ms'])
        row['configs'], row['best'] = configs, best
        row['step_saving_ms'] = count * (row['backward_default_ms'] - best['ms'])
        saving += row['step_saving_ms']
        results.append(row)
        print(f"{stage}: {M} rows x {C} channels, {count} per step")
        print(f"  forward  {row['forward_ms']:.3f} ms ({row['forward_GBps']:.0f} GB/s)   plain "
              f"{row['plain_forward_ms']:.3f} ms")
        print(f"  backward {row['backward_default_ms']:.3f} ms ({row['backward_GBps']:.0f} GB/s; 1024 programs, "
              f"{default_m} rows per step, {default_warps} warps)   plain {row['plain_backward_ms']:.3f} ms")
        print(f"  fastest backward: {best['ms']:.3f} ms ({8 * gb / best['ms']:.0f} GB/s) with {best['max_programs']} "
              f"programs, {best['block_m']} rows per step, {best['num_warps']} warps")
        for c in sorted(configs, key=lambda c: c['ms'])[:5]:
            print(f"    {c['ms']:.3f} ms  programs {c['max_programs']:>6}  rows/step {c['block_m']:>3}  "
                  f"warps {c['num_warps']}")
    print(f"the fastest backward configurations would save {saving:.2f} ms per training step of "
          f"Sequencer2D-S at batch {B}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(batch_size=B, device=torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu',
                           torch=torch.__version__, results=results, step_saving_ms=saving), f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
