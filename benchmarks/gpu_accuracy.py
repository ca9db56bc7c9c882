"""How far one BiLSTM2D under bf16 autocast on a GPU is from the exact result (float64 on the CPU, same
weights), for each engine: the largest error of the output, the input gradient and every parameter
gradient, relative to that tensor's largest entry.

    python benchmarks/gpu_accuracy.py [--shape B H W] [--channels 64] [--hidden 48]
"""
import argparse
import copy
import sys

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--shape', type=int, nargs=3, default=(4, 8, 6), metavar=('B', 'H', 'W'))
    p.add_argument('--channels', type=int, default=64)
    p.add_argument('--hidden', type=int, default=48)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit('gpu_accuracy.py: needs a CUDA device')
    from sequencer import set_engine
    from sequencer.models.blocks import RNN2D
    torch.manual_seed(args.seed)
    m = RNN2D(args.channels, args.hidden)
    x = torch.randn(*args.shape, args.channels)
    g = torch.randn(*args.shape, args.channels)
    names = ['output', 'input grad'] + [n for n, _ in m.named_parameters()]

    def run(device, dtype, engine, autocast):
        mm = set_engine(copy.deepcopy(m).to(device, dtype), engine)
        xi = x.to(device, dtype).requires_grad_(True)
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
            y = mm(xi)
        (y.to(dtype) * g.to(device, dtype)).sum().backward()
        return [t.detach().double().cpu() for t in [y, xi.grad] + [q.grad for q in mm.parameters()]]

    exact = run('cpu', torch.float64, 'native', False)
    for engine in ('native', 'fused'):
        got = run('cuda', torch.float32, engine, True)
        errs = [((a - b).abs().max() / a.abs().max()).item() for a, b in zip(exact, got)]
        print(f'{engine:<7} max {max(errs):.2e}  min {min(errs):.2e}  ' +
              ' '.join(f'{n}={e:.1e}' for n, e in zip(names, errs)))


if __name__ == '__main__':
    main()
