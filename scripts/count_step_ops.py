"""The number of torch operators one training step of a model dispatches: on a GPU each is (at least) one
kernel launch and some microseconds of host time, so this count bounds how fast a host can feed a device.
Also the storage of the tensors autograd saves in one forward (what the backward will read; the largest
share of training memory), counted with ``torch.autograd.graph.saved_tensors_hooks``.

Runs on the CPU. ``--triton`` sends the fused engine through the GPU path's Triton kernels (run by Triton's
interpreter on CPU tensors, so the same operators are dispatched as on CUDA); the image is small (64 px by
default) since the count does not depend on it.

    TRITON_INTERPRET=1 python scripts/count_step_ops.py [--model sequencer2d_s] [--triton] [--precision bf16]
        [--batch-size 2] [--img-size 64]
    python scripts/count_step_ops.py --timm
"""
import argparse
import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts every operator dispatched while active, by name (``.ops``); also used by the tests."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='sequencer2d_s')
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--precision', choices=('fp32', 'bf16'), default='bf16')
    p.add_argument('--triton', action='store_true', help="the fused engine's GPU path (Triton interpreter)")
    p.add_argument('--timm', action='store_true', help="timm's model instead of ours")
    p.add_argument('--top', type=int, default=15, help='list the most frequent operators')
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.timm:
        import timm
        model = timm.create_model(args.model)
    else:
        from sequencer import create_model
        from sequencer.layers import fused_lstm
        model = create_model(args.model)
        model.set_rnn_engine('fused')
        if args.triton:
            fused_lstm._TRITON_ON_CPU[0] = True
    off = contextlib.nullcontext
    if args.triton and not args.timm:   # not the CPU kernel: the Triton kernels, as on CUDA
        off = fused_lstm.cpu_kernel_disabled
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    lowp = args.precision == 'bf16'

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=lowp), off():
            loss = model(x).float().sum()
        loss.backward()

    step()   # first use: builds and caches what later steps reuse
    counter = OpCounter()
    with counter:
        step()
    what = f"{'timm' if args.timm else 'ours'}, {args.model}, {args.precision}"
    print(f"{sum(counter.ops.values())} operators in one training step ({what}{', Triton path' if args.triton else ''})")
    for name, n in counter.ops.most_common(args.top):
        print(f'  {n:6d}  {name}')
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), off(), \
            torch.autocast('cpu', dtype=torch.bfloat16, enabled=lowp):
        model(x)
    print(f'{sum(storages.values()) / 2 ** 20:.1f} MB of saved tensors in one forward '
          f'(batch {args.batch_size}, {args.img_size} px)')


if __name__ == '__main__':
    main()
