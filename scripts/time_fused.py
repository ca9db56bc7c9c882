"""Time Sequencer2D with the fused RNN engine against timm's sequencer2d (native nn.LSTM), alternately.

    .venv/bin/python scripts/time_fused.py --model sequencer2d_s --batch-size 8 --threads 2 --rounds 7
    .venv/bin/python scripts/time_fused.py --threads 1 --clock process   # CPU time, for a busy machine

Both models get the same weights. Each round times one step of every contestant in turn (after warm-up),
so slow phases of a shared machine hit all of them alike; the printed ratio is the median over rounds of
timm's step time divided by ours (higher is better for us). Modes: 'infer' (no_grad forward, eval mode)
and 'train' (forward + backward of the summed logits, train mode).
"""
import argparse
import os
import statistics
import time

import timm
import torch

import sequencer


def step_fn(model, x, mode):
    if mode == 'infer':
        def step():
            with torch.no_grad():
                model(x)
    else:
        def step():
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='sequencer2d_s')
    ap.add_argument('--batch-size', type=int, default=8)
    ap.add_argument('--img-size', type=int, default=224)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--rounds', type=int, default=7)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--modes', default='infer,train')
    ap.add_argument('--engines', default='fused', help="engines of our model to time, e.g. 'fused,native'")
    ap.add_argument('--clock', default='wall', choices=('wall', 'process'),
                    help="'wall': elapsed time; 'process': CPU time of this process (with --threads 1, the "
                         "work itself, little affected by other jobs on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == 'wall' else time.process_time
    torch.manual_seed(0)
    ref = timm.create_model(args.model)
    contestants = {'timm': ref}
    for engine in args.engines.split(','):
        ours = sequencer.create_model(args.model)
        ours.load_state_dict(ref.state_dict())
        contestants[engine] = ours.set_rnn_engine(engine)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.model}, batch {args.batch_size}, "
          f"{args.img_size}px, fp32, {args.threads} threads, {args.clock} clock, {time.strftime('%Y-%m-%d')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for mode in args.modes.split(','):
        steps = {}
        for name, model in contestants.items():
            model.train(mode == 'train')
            steps[name] = step_fn(model, x, mode)
            for _ in range(args.warmup):
                steps[name]()
        times = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                t0 = clock()
                step()
                times[name].append(clock() - t0)
        for name in steps:
            if name == 'timm':
                continue
            ratios = [a / b for a, b in zip(times['timm'], times[name])]
            print(f"{mode:5s} {name:7s}: {statistics.median(times[name]) * 1e3:8.1f} ms/step, "
                  f"timm {statistics.median(times['timm']) * 1e3:8.1f} ms/step, "
                  f"speed-up x{statistics.median(ratios):.2f} (per-round ratios "
                  f"{', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == '__main__':
    main()
