"""The number of torch operators (and Triton kernel launches) one training step of a model dispatches: on a
GPU each is (at least) one kernel launch and some microseconds of host time, so this count bounds how fast a
host can feed a device. Also the storage of the tensors autograd saves in one forward (what the backward will
read; the largest share of training memory), counted with ``torch.autograd.graph.saved_tensors_hooks``.

Runs on the CPU. ``--triton`` sends the fused engine through the GPU path's Triton kernels (run by Triton's
interpreter on CPU tensors, so the same operators are dispatched as on CUDA; the interpreter's own work inside
a launch is not counted); the image is small (64 px by default) since the count does not depend on it.

``--host-time N`` times N steps of the same code path with every Triton launch replaced by a no-op and the
model's widths cut to 8 channels (hidden size 4) at 28 px, so that the step computes next to nothing: what
remains is the host's work (Python, dispatch, autograd, allocation), one thread. A proxy for the host time
of a GPU step: it leaves out the CUDA launch cost of each kernel and Triton's launcher; compare runs, not
absolute figures.

    TRITON_INTERPRET=1 python scripts/count_step_ops.py [--model sequencer2d_s] [--triton] [--precision bf16]
        [--batch-size 2] [--img-size 64]
    python scripts/count_step_ops.py --timm
    python scripts/count_step_ops.py --triton --host-time 30 [--timm] [--no-fused-norm]
"""
import argparse
import collections
import contextlib
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts every operator dispatched while active, by name (``.ops``); also used by the tests. Triton kernels
    launched outside torch operators are counted in ``.launches`` where ``count_launches`` is in effect."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.launches = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


class _Launcher:
    """``kernel[grid](...)`` that counts the launch, and runs it (or not, with ``run=False``) unseen by the
    counter (the interpreter executes a kernel with torch operators of its own)."""

    def __init__(self, kernel, name, counter, run):
        self.kernel, self.name, self.counter, self.run = kernel, name, counter, run

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.counter is not None:
                self.counter.launches[self.name] += 1
                self.counter.paused, paused = True, self.counter.paused
            try:
                if self.run:
                    self.kernel[grid](*args, **kwargs)
            finally:
                if self.counter is not None:
                    self.counter.paused = paused
        return launch


@contextlib.contextmanager
def count_launches(counter, run=True):
    """Within this context the Triton LayerNorm's launches are counted in ``counter.launches`` (the LSTM
    kernels are torch operators, counted as such) and, with ``run=False``, skipped."""
    try:
        from sequencer.layers import triton_norm
    except ImportError:   # a version without it
        yield
        return
    real = triton_norm._kernel
    triton_norm._kernel = lambda fn, interpret: _Launcher(real(fn, interpret), fn.__name__, counter, run)
    try:
        yield
    finally:
        triton_norm._kernel = real


@contextlib.contextmanager
def _no_lstm_kernels():
    """The LSTM kernels' ops allocate their outputs but launch nothing."""
    from sequencer.layers import triton_lstm
    saved = triton_lstm.lstm_recurrence_triton, triton_lstm.lstm_backward_triton

    def recurrence(xp, w_hh, rows, D, N, hidden, out_rows, save, R=None, config=None):
        if not save:
            return None
        keep = triton_lstm._saved_dtype(w_hh.dtype)
        T = rows.shape[0]
        return (xp.new_empty(T, D, N, 4 * hidden, dtype=keep), xp.new_empty(T, D, N, hidden, dtype=keep))

    triton_lstm.lstm_recurrence_triton = recurrence
    triton_lstm.lstm_backward_triton = lambda *a, **k: None
    try:
        yield
    finally:
        triton_lstm.lstm_recurrence_triton, triton_lstm.lstm_backward_triton = saved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='sequencer2d_s')
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--precision', choices=('fp32', 'bf16'), default='bf16')
    p.add_argument('--triton', action='store_true', help="the fused engine's GPU path (Triton interpreter)")
    p.add_argument('--timm', action='store_true', help="timm's model instead of ours")
    p.add_argument('--top', type=int, default=15, help='list the most frequent operators')
    p.add_argument('--no-fused-norm', action='store_true', help="plain LayerNorms instead of the GPU path's Triton "
                   "pre-norm kernels (as `sequencer benchmark --no-fused-norm`)")
    p.add_argument('--host-time', type=int, default=0, metavar='N',
                   help='time N steps that compute next to nothing (see the module doc) instead of counting')
    args = p.parse_args(argv)
    torch.manual_seed(0)
    narrow = dict(embed_dims=(8, 8, 8, 8), hidden_sizes=(4, 4, 4, 4), num_classes=10) if args.host_time else {}
    if args.host_time:
        torch.set_num_threads(1)
        args.img_size, args.batch_size = 28, 1
    if args.timm:
        import timm
        model = timm.create_model(args.model, **narrow)
    else:
        from sequencer import create_model
        from sequencer.layers import fused_lstm
        model = create_model(args.model, **narrow)
        model.set_rnn_engine('fused')
        if args.no_fused_norm:
            from sequencer.layers.blocks import SequencerBlock
            for m in model.modules():
                if isinstance(m, SequencerBlock):
                    m.fused_norm = False
        if args.triton:
            fused_lstm._TRITON_ON_CPU[0] = True
    off = contextlib.nullcontext
    if args.triton and not args.timm:   # not the CPU kernel: the Triton kernels, as on CUDA
        off = fused_lstm.cpu_kernel_disabled
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    lowp = args.precision == 'bf16'
    what = (f"{'timm' if args.timm else 'ours'}, {args.model}, {args.precision}{', Triton path' if args.triton else ''}"
            f"{', plain LayerNorms' if args.no_fused_norm and not args.timm else ''}")

    if args.host_time:
        target = torch.randint(0, 10, (1,))
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True)   # as on CUDA

        def train_step():
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=lowp), off():
                loss = torch.nn.functional.cross_entropy(model(x), target)
            opt.zero_grad(set_to_none=True)
            with off():
                loss.backward()
            opt.step()

        quiet = args.triton and not args.timm
        with (count_launches(None, run=False) if quiet else contextlib.nullcontext()), \
                (_no_lstm_kernels() if quiet else contextlib.nullcontext()):
            for _ in range(5):
                train_step()
            times = []
            for _ in range(args.host_time):
                t0 = time.perf_counter()
                train_step()
                times.append(time.perf_counter() - t0)
        print(f'host time of one training step ({what}; 8 channels, 28 px, batch 1, kernels not run, 1 thread): '
              f'median {statistics.median(times) * 1e3:.2f} ms, min {min(times) * 1e3:.2f} ms over {args.host_time}')
        return

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=lowp), off():
            loss = model(x).float().sum()
        with off():
            loss.backward()

    step()   # first use: builds and caches what later steps reuse
    counter = OpCounter()
    with (count_launches(counter) if args.triton and not args.timm else contextlib.nullcontext()), counter:
        step()
    launches = sum(counter.launches.values())
    print(f"{sum(counter.ops.values())} operators" + (f" and {launches} Triton launches" if launches else '')
          + f" in one training step ({what})")
    for name, n in counter.ops.most_common(args.top):
        print(f'  {n:6d}  {name}')
    for name, n in sorted(counter.launches.items()):
        print(f'  {n:6d}  {name} (Triton launch)')
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
