"""The compiled CPU recurrence of the fused engine (``sequencer/csrc/lstm2d_cpu.cpp``).

The kernel is built from source with the system's C++ compiler the first time it is needed (about a
minute; ``torch.utils.cpp_extension`` caches the build under ``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``, so later processes load it in well under a second). Prebuild it with
``sequencer build-kernel``.

Without a compiler (or with ``SEQUENCER_CPU_KERNEL=0`` in the environment) the fused engine runs its
torch implementation instead: the same numbers, more slowly. ``available()`` says which is in use.
"""
import os
import platform
import threading
import warnings
from pathlib import Path
from typing import Optional

SOURCE = Path(__file__).resolve().parent.parent / 'csrc' / 'lstm2d_cpu.cpp'
ENV = 'SEQUENCER_CPU_KERNEL'

_lock = threading.Lock()
_state = {'tried': False, 'ok': False, 'error': None}


def _isa_flags():
    """(suffix, flags): the widest x86 level this CPU supports (the build is cached per level)."""
    if platform.machine() not in ('x86_64', 'AMD64'):
        return 'generic', []
    try:
        flags = set()
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
                    break
    except OSError:
        flags = set()
    if {'avx512f', 'avx512bw', 'avx512cd', 'avx512dq', 'avx512vl', 'avx2', 'fma'} <= flags:
        return 'x86_64_v4', ['-march=x86-64-v4', '-mprefer-vector-width=512']
    if {'avx2', 'fma', 'bmi2'} <= flags:
        return 'x86_64_v3', ['-march=x86-64-v3']
    return 'x86_64', []


def enabled() -> bool:
    return os.environ.get(ENV, '1').strip().lower() not in ('0', 'false', 'no', 'off')


def load(verbose: bool = False, raise_errors: bool = False) -> bool:
    """Build (first time) and load the kernel; True when ``torch.ops.sequencer_lstm2d`` is usable."""
    with _lock:
        if _state['tried'] and not (raise_errors and not _state['ok']):
            return _state['ok']
        _state['tried'] = True
        if not enabled():
            _state['error'] = f'disabled by {ENV}'
            return False
        try:
            from torch.utils.cpp_extension import load as _load
            suffix, flags = _isa_flags()
            _load(name=f'sequencer_lstm2d_{suffix}', sources=[str(SOURCE)],
                  extra_cflags=['-O3', '-fno-trapping-math', '-fno-math-errno', '-fopenmp', *flags],
                  extra_ldflags=['-fopenmp'], is_python_module=False, verbose=verbose)
            _state['ok'] = True
        except Exception as e:  # no compiler, no ninja, a failed build: fall back to the torch code
            _state['error'] = f'{type(e).__name__}: {e}'.strip().splitlines()[0]
            if raise_errors:
                raise
            warnings.warn(f"sequencer: the CPU LSTM kernel could not be built ({_state['error']}); "
                          f"the fused engine uses its slower torch implementation", RuntimeWarning,
                          stacklevel=3)
        return _state['ok']


def available() -> bool:
    """Whether the compiled kernel is (or can be) loaded in this process; builds it if needed."""
    return load()


def error() -> Optional[str]:
    return _state['error']
