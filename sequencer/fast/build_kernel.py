"""``sequencer build-kernel``: build (or load) the compiled CPU kernels now, check them, say where they are."""
import time

import torch

from ..errors import UserError
from ..models.blocks import RNN2D
from . import cpu_kernel
from .modules import set_engine
from .runtime import cpu_kernel_disabled


def add_arguments(p) -> None:
    p.add_argument('--verbose', action='store_true', help="show the compiler's command lines and output")


def run(args) -> int:
    if not cpu_kernel.enabled():
        raise UserError(f'{cpu_kernel.ENV}=0 in the environment: the CPU kernel is disabled')
    t0 = time.perf_counter()
    try:
        cpu_kernel.load(verbose=args.verbose, raise_errors=True)
    except RuntimeError as e:
        raise UserError(f'{e} (is a C++ compiler installed? `--verbose` shows the build)') from None
    took = time.perf_counter() - t0
    torch.manual_seed(0)
    m = set_engine(RNN2D(16, 8).float(), 'fused')
    x = torch.randn(2, 5, 7, 16)
    with torch.no_grad():
        y_kernel = m(x)
        with cpu_kernel_disabled():
            y_torch = m(x)
        diff = (y_kernel - y_torch).abs().max().item()
    print(f"CPU LSTM kernel {cpu_kernel.loaded_name()}: ready in {took:.1f} s, build directory "
          f"{cpu_kernel.build_directory()}")
    print(f"self-check against the torch implementation: max |difference| {diff:.2e}")
    if not diff < 1e-5:
        print("build-kernel: error: the kernel disagrees with the torch implementation; "
              f"set {cpu_kernel.ENV}=0 to disable it", flush=True)
        return 1
    return 0
