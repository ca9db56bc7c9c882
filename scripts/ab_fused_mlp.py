"""Our model with and without one CPU fusion, timed alternately step by step in one process.

    python scripts/ab_fused_mlp.py [--fusion mlp|block] [--one-copy] [--model sequencer2d_s] [--batch-size 8]
                                   [--threads 2] [--iters 12]

``--one-copy`` flips the switch on one model between steps instead of keeping two copies. ``--fusion mlp``
(the default) switches the fused channel MLP (``Mlp.fused``); ``--fusion block`` switches
the block-level fusions (``SequencerBlock.fuse_residual``: residual adds inside the branches' last GEMMs,
the pre-norm backward with the residual's gradient). Prints the median step time of each copy and the
speed-up, for inference (no_grad, eval) and training (zero_grad + forward + cross-entropy + backward + SGD
step), on CPU in float32. Both copies have the same weights; the switch is the only difference.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sequencer import create_model
from sequencer.layers import SequencerBlock
from sequencer.layers.fused_mlp import Mlp

SWITCHES = {'mlp': (Mlp, 'fused', 'timm-style MLP', 'fused MLP'),
            'block': (SequencerBlock, 'fuse_residual', 'plain residuals', 'block fusions')}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--fusion', choices=sorted(SWITCHES), default='mlp', help='what to switch off in one copy')
    p.add_argument('--model', default='sequencer2d_s')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--iters', type=int, default=12, help='measured steps per copy and mode (default 12)')
    p.add_argument('--one-copy', action='store_true',
                   help='one model, the switch flipped between steps (no second copy in memory)')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fused = create_model(args.model)
    plain = fused if args.one_copy else create_model(args.model)
    plain.load_state_dict(fused.state_dict())
    cls, attr, off_label, on_label = SWITCHES[args.fusion]

    def switch(model, on):
        for m in model.modules():
            if isinstance(m, cls):
                setattr(m, attr, on)

    switch(plain, False)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch_size,))
    for mode in ('infer', 'train'):
        copies = {}
        for name, model in (('plain', plain), ('fused', fused)):
            model.train(mode == 'train')
            opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
            copies[name] = (model, opt)
        switch(fused, True)
        assert any(m.fusable(x.new_zeros(1, m.fc1.in_features)) for m in fused.modules() if isinstance(m, Mlp))
        assert all(b._residual_into_branches() for b in fused.modules() if isinstance(b, SequencerBlock))

        def step(model, opt):
            if mode == 'infer':
                with torch.no_grad():
                    model(x)
            else:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()

        times = {name: [] for name in copies}
        for i in range(args.iters + 2):          # two warm-up steps each; the order swaps every iteration
            for name, (model, opt) in (list(copies.items()) if i % 2 == 0 else list(copies.items())[::-1]):
                if args.one_copy:
                    switch(model, name == 'fused')
                t0 = time.perf_counter()
                step(model, opt)
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        print(f"{mode}: {off_label} {med['plain']:.1f} ms, {on_label} {med['fused']:.1f} ms, "
              f"speed-up {med['plain'] / med['fused']:.3f}x (median step, {args.iters} steps each)")


if __name__ == '__main__':
    main()
