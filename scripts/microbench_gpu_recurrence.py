"""GPU microbenchmark of one BiLSTM2D at Sequencer2D-S shapes: cuDNN (the native engine, as timm runs it)
against the fused engine's Triton recurrences, and the Triton kernels alone for each launch configuration.

Not figures of record (those come from ``sequencer benchmark``): these time one layer or one kernel, median
of ``--iters`` calls measured with CUDA events, to see where the time of a step goes.

    python scripts/microbench_gpu_recurrence.py [--batch-size 256] [--precision bf16] [--iters 20]
        [--configs] [--json FILE]

Shapes: stage 1 (32x32 tokens, 192 channels, hidden 48) and stages 2-4 (16x16 tokens, 384 channels,
hidden 96) at 224 px. ``--configs`` also times the forward (with saved activations) and backward kernels
for every candidate launch configuration of ``triton_lstm.CANDIDATES``.
"""
import argparse
import json
import statistics
import sys
import time

import torch

STAGES = {'stage1': (32, 32, 192, 48), 'stage3': (16, 16, 384, 96)}


def timed(fn, iters, cuda: bool = True):
    """Median milliseconds of ``iters`` calls of ``fn`` after 3 warm-ups: CUDA events, or the wall clock."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--precision', choices=('bf16', 'fp16', 'fp32'), default='bf16')
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--configs', action='store_true', help='time every candidate launch configuration')
    p.add_argument('--json', default=None, help='write the results to this JSON file')
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit('microbench_gpu_recurrence.py: needs a CUDA device')
    from sequencer.layers import RNN2D, triton_lstm
    from sequencer.layers import fused_lstm as fl
    dt = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}[args.precision]
    lowp = dt != torch.float32
    dev = torch.device('cuda')
    results = []
    for stage, (H, W, C, hid) in STAGES.items():
        B = args.batch_size
        layer = RNN2D(C, hid).to(dev)
        x = torch.randn(B, H, W, C, device=dev, requires_grad=True)
        for engine in ('native', 'fused'):
            layer.engine = engine

            def infer():
                with torch.no_grad(), torch.autocast('cuda', dtype=dt, enabled=lowp):
                    layer(x)

            def train():
                with torch.autocast('cuda', dtype=dt, enabled=lowp):
                    y = layer(x)
                y.float().sum().backward()

            row = {'stage': stage, 'what': f'BiLSTM2D {engine}', 'infer_ms': timed(infer, args.iters),
                   'train_ms': timed(train, args.iters)}
            results.append(row)
            print(f"{stage} {row['what']:<22} infer {row['infer_ms']:8.3f} ms  train {row['train_ms']:8.3f} ms",
                  flush=True)
        # the kernels alone
        kinds = ((True, False), (True, True), (False, False), (False, True))
        D, G = 4, 4 * hid
        rows, _, _, _ = fl._build_plan(B, H, W, kinds, dev)
        N = rows.shape[1] // D
        R = B * H * W * D
        pdt = dt if lowp else torch.float32
        xp = torch.randn(R, G, device=dev).to(pdt)
        w = (torch.randn(D, G, hid, device=dev) * 0.1).to(pdt)
        y = torch.empty(R, hid, device=dev, dtype=pdt)
        gy = torch.randn(R, hid, device=dev).to(pdt)
        dxp = torch.empty(R, G, device=dev, dtype=pdt)
        configs = [None] + (list(triton_lstm.CANDIDATES) if args.configs else [])
        for cfg in configs:
            try:
                saved = triton_lstm.lstm_recurrence_triton(xp, w, rows, D, N, hid, y, True, R=R, config=cfg)
                fwd = timed(lambda: triton_lstm.lstm_recurrence_triton(xp, w, rows, D, N, hid, y, True, R=R,
                                                                       config=cfg), args.iters)
                bwd = timed(lambda: triton_lstm.lstm_backward_triton(gy, *saved, w, rows, D, N, hid, dxp, R=R,
                                                                     config=cfg), args.iters)
            except Exception as e:   # a configuration the compiler rejects (registers, shared memory)
                print(f'{stage} config {cfg}: {type(e).__name__}: {str(e)[:200]}', flush=True)
                continue
            name = 'autotuned' if cfg is None else f'bn{cfg.block_n} w{cfg.num_warps} reload{int(cfg.reload)}'
            results.append({'stage': stage, 'what': f'kernels {name}', 'fwd_ms': fwd, 'bwd_ms': bwd})
            print(f'{stage} kernels {name:<22} fwd {fwd:8.3f} ms  bwd {bwd:8.3f} ms', flush=True)
    chosen = triton_lstm.best_configs()
    print('autotuned choices:', json.dumps(chosen))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'device': torch.cuda.get_device_name(), 'torch': torch.__version__,
                       'batch_size': args.batch_size, 'precision': args.precision, 'results': results,
                       'autotuned': chosen}, f, indent=1)


if __name__ == '__main__':
    main()
