"""The compiled CPU kernels: the fused engine's recurrence (``sequencer/fast/csrc/lstm2d_cpu.cpp``), the fused
MLP's bias + GELU passes (``sequencer/fast/csrc/mlp_cpu.cpp``) and the pre-norm's backward with the residual's
gradient (``sequencer/fast/csrc/norm_cpu.cpp``), built together as one extension.

The kernel is built from source with the system's C++ compiler (and ``ninja``, a dependency of this
package) the first time it is needed -- about 10 s; ``torch.utils.cpp_extension`` caches the build
under ``$TORCH_EXTENSIONS_DIR`` (by default ``~/.cache/torch_extensions``), so later processes load it
in well under a second. ``sequencer build-kernel`` builds it ahead of time and says where.

The build targets the widest x86-64 level the CPU supports (v4: AVX-512, v3: AVX2 + FMA) with OpenMP,
each variant cached under its own name, and falls back to the baseline flags, then to a build without
OpenMP, if a build fails. ``SEQUENCER_CPU_ISA=x86_64_v3`` (or ``baseline``) builds for a lower level than the
CPU's, e.g. to run this kernel as it runs on an AVX2 processor. Without a compiler
(or with ``SEQUENCER_CPU_KERNEL=0`` in the environment) the fused engine runs its torch implementation
instead -- the same numbers, more slowly -- and 'auto' picks the native engine for CPU inference.
"""
import logging
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import UserError

CSRC = Path(__file__).resolve().parent / 'csrc'
SOURCES = [CSRC / 'lstm2d_cpu.cpp', CSRC / 'mlp_cpu.cpp', CSRC / 'norm_cpu.cpp']   # and cpu_math.h
ENV = 'SEQUENCER_CPU_KERNEL'
CPUINFO = '/proc/cpuinfo'
ISA_ENV = 'SEQUENCER_CPU_ISA'
# x86-64 levels, widest first: (name, /proc/cpuinfo flags it needs, compiler flags)
LEVELS = [
    ('x86_64_v4', {'avx512f', 'avx512bw', 'avx512cd', 'avx512dq', 'avx512vl', 'avx2', 'fma', 'bmi2'},
     ['-march=x86-64-v4', '-mprefer-vector-width=512']),
    ('x86_64_v3', {'avx2', 'fma', 'bmi2'}, ['-march=x86-64-v3']),
]
BASE_FLAGS = ['-O3', '-fno-trapping-math', '-fno-math-errno']

_lock = threading.Lock()
_state = {'tried': False, 'ok': False, 'error': None, 'name': None}


# environment variables that hold a library below the processor's instruction set (e.g. to run as on an AVX2
# processor): PyTorch's own kernels, MKL, oneDNN, this kernel
ISA_LIMITS = ('ATEN_CPU_CAPABILITY', 'MKL_ENABLE_INSTRUCTIONS', 'ONEDNN_MAX_CPU_ISA', ISA_ENV)


def isa_limits() -> dict:
    """The ``ISA_LIMITS`` variables set in this process's environment, with their values."""
    return {k: os.environ[k] for k in ISA_LIMITS if os.environ.get(k, '').strip()}


def cpu_level() -> Optional[str]:
    """The widest x86-64 level of ``LEVELS`` this CPU runs (whatever ``SEQUENCER_CPU_ISA`` says), or None."""
    return next((name for name, _ in _runnable_levels()), None)


def _runnable_levels() -> List[Tuple[str, List[str]]]:
    """(name, compiler flags) of the ``LEVELS`` this CPU runs, widest first; none off x86-64."""
    if platform.machine() not in ('x86_64', 'AMD64'):
        return []
    flags = _cpu_flags()
    return [(name, march) for name, needs, march in LEVELS if needs <= flags]


def _cpuinfo() -> Dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ('model name', 'cpu family', 'flags', ...); empty without
    one, or off Linux."""
    fields: Dict[str, str] = {}
    try:
        with open(CPUINFO) as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, sep, value = line.partition(':')
                if sep:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model_name() -> str:
    """/proc/cpuinfo's 'model name' (e.g. 'Intel(R) Xeon(R) Processor'), '' where there is none."""
    return _cpuinfo().get('model name', '')


# the instruction-set extensions named in benchmark results: what the GEMMs (fp32 and bf16) can use
FEATURES = ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_tile', 'amx_bf16')


def cpu_signature() -> Dict[str, object]:
    """The processor's vendor and its family and model numbers, as /proc/cpuinfo gives them, with which of
    ``FEATURES`` it has; empty where /proc/cpuinfo has no such fields. A model name can cover several
    micro-architectures (a virtual machine's 'AMD EPYC' may be Zen 4, family 25, or Zen 5, family 26), whose
    speeds differ: these numbers tell them apart."""
    info = _cpuinfo()
    out: Dict[str, object] = {}
    if info.get('vendor_id'):
        out['vendor'] = info['vendor_id']
    for key, name in (('cpu family', 'family'), ('model', 'model')):
        if info.get(key, '').isdigit():
            out[name] = int(info[key])
    if 'flags' in info:
        flags = set(info['flags'].split())
        out['features'] = [f for f in FEATURES if f in flags]
    return out


def cpu_description() -> str:
    """The model name with its family and model numbers where known, e.g. 'AMD EPYC (family 25, model 17)'."""
    sig = cpu_signature()
    name = cpu_model_name() or platform.processor() or platform.machine() or 'unknown CPU'
    if 'family' in sig and 'model' in sig:
        name += f" (family {sig['family']}, model {sig['model']})"
    return name


def _cpu_flags() -> set:
    return set(_cpuinfo().get('flags', '').split())


def isa_level() -> str:
    """The x86-64 micro-architecture level of this CPU that the kernel is built for: 'x86_64_v4' (AVX-512),
    'x86_64_v3' (AVX2 + FMA), else the machine name (the baseline build)."""
    return _variants()[0][0]


def _variants() -> List[Tuple[str, List[str], List[str]]]:
    """(name suffix, compiler flags, linker flags) to try in order: the widest x86 level this CPU runs with
    OpenMP, the baseline with OpenMP, the baseline without OpenMP (single-threaded cell updates; for
    compilers without OpenMP support, such as Apple's clang)."""
    omp = ['-fopenmp']
    out = []
    cap = _requested_level()
    runnable = _runnable_levels()
    names = [name for name, _ in runnable]
    if cap not in (None, 'baseline') and cap not in names:
        raise UserError(f"{ISA_ENV}={cap}: this CPU does not run that x86-64 level (it runs "
                        f"{', '.join(names + ['baseline'])})")
    if cap is not None:
        runnable = [] if cap == 'baseline' else runnable[names.index(cap):]
    out.extend((name, [*march, *omp], omp) for name, march in runnable[:1])
    base = platform.machine().lower() or 'generic'
    out.append((base, omp, omp))
    out.append((f'{base}_noomp', [], []))
    return out


def _requested_level() -> Optional[str]:
    """The level ``SEQUENCER_CPU_ISA`` asks for ('x86_64_v4', 'x86_64_v3' or 'baseline'), None when unset."""
    names = [name for name, _, _ in LEVELS]
    value = os.environ.get(ISA_ENV, '').strip().lower().replace('-', '_')
    if value in ('', 'auto'):
        return None
    if value not in names + ['baseline']:
        raise UserError(f"{ISA_ENV} must be 'auto', {', '.join(repr(n) for n in names)} or 'baseline', "
                        f"got {value!r}")
    return value


def enabled() -> bool:
    """False when ``SEQUENCER_CPU_KERNEL`` is 0 / false / no / off."""
    return os.environ.get(ENV, '1').strip().lower() not in ('0', 'false', 'no', 'off')


def _build(name: str, flags: List[str], ldflags: List[str], verbose: bool) -> None:
    quiet = logging.getLogger('torch.utils.cpp_extension')
    level = quiet.level
    if not verbose:
        quiet.setLevel(logging.ERROR)   # "No CUDA runtime is found" (logged on import): irrelevant here
    try:
        from torch.utils import cpp_extension  # imported here, after the logger is quietened (it logs on import)
        built = Path(cpp_extension._get_build_directory(name, verbose=False)) / f'{name}.so'
        if not built.exists() and not verbose:
            print(f"sequencer: building the fused RNN engine's CPU kernel ({name}, first use only, about "
                  f"10 s)", file=sys.stderr, flush=True)
        cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=BASE_FLAGS + flags,
                           extra_ldflags=ldflags, is_python_module=False, verbose=verbose)
    finally:
        quiet.setLevel(level)


def load(verbose: bool = False, raise_errors: bool = False) -> bool:
    """Build (the first time) and load the kernel; True when ``torch.ops.sequencer_lstm2d`` is usable.

    Failures are remembered for the process: a warning is issued once and the torch implementation runs.
    With ``raise_errors`` a failure raises instead (``sequencer build-kernel`` and the tests use it).
    """
    with _lock:
        if _state['tried'] and (_state['ok'] or not raise_errors):
            return _state['ok']
        variants = _variants() if enabled() else []   # a bad SEQUENCER_CPU_ISA raises here, every time
        _state['tried'] = True
        if not enabled():
            _state['error'] = f'disabled by {ENV}=0'
            if raise_errors:
                raise RuntimeError(_state['error'])
            return False
        errors = []
        for suffix, flags, ldflags in variants:
            try:
                _build(f'sequencer_lstm2d_{suffix}', flags, ldflags, verbose)
                _register_fake_ops()
                _state.update(ok=True, error=None, name=f'sequencer_lstm2d_{suffix}')
                return True
            except Exception as e:  # no compiler, no ninja, a failed build: try the next flags
                errors.append(f'{type(e).__name__}: ' + (str(e).strip().splitlines() or [''])[0])
        _state['error'] = '; '.join(errors)
        if raise_errors:
            raise RuntimeError(f"the CPU LSTM kernel could not be built: {_state['error']}")
        warnings.warn(f"sequencer: the CPU LSTM kernel could not be built ({_state['error']}); the fused "
                      f"engine uses its slower torch implementation (rebuild with --verbose: "
                      f"`sequencer build-kernel --verbose`)", RuntimeWarning, stacklevel=3)
        return False


def prepare_for_compile(device) -> None:
    """Load (building if needed) the kernel before ``torch.compile`` traces a model that runs on ``device``:
    tracing keeps the kernel's ops in the graph only when it is already loaded, and never builds it."""
    if torch.device(device).type == 'cpu':
        available()


def loaded() -> bool:
    """Whether the kernel is loaded in this process (never builds; safe while torch.compile traces)."""
    return _state['ok']


def _register_fake_ops() -> None:
    """Shape-only versions of the kernel's ops, so that torch.compile can keep them in its graphs."""

    def dims(B, H, W, kinds, hidden):
        T = max(H if k & 2 else W for k in kinds)
        N = max(B * W if k & 2 else B * H for k in kinds)
        return T, len(kinds), N, 4 * hidden

    @torch.library.register_fake('sequencer_lstm2d::forward')
    def _forward(xp, bias, whh_t, B, H, W, kinds, hidden, y, save, xin=None):
        if not save:
            return xp.new_empty(0)
        T, D, N, G = dims(B, H, W, kinds, hidden)
        return xp.new_empty(T, D, N, hidden)

    @torch.library.register_fake('sequencer_lstm2d::backward')
    def _backward(gy, gates, cs, whh, y, B, H, W, kinds, hidden, dwhh, db, dxp=None):
        return None

    @torch.library.register_fake('sequencer_norm::layer_norm_backward_residual')
    def _norm_backward(g, x, mean, rstd, weight, g_res, res_sum=False):
        return (torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight),
                torch.empty_like(weight) if res_sum else weight.new_empty(0))

    @torch.library.register_fake('sequencer_norm::layer_norm_residual_bias')
    def _norm_residual_bias(x, weight, bias, eps, r_bias):
        stats = x.new_empty((*x.shape[:-1], 1))
        return torch.empty_like(x), stats, torch.empty_like(stats), torch.empty_like(x)


def available() -> bool:
    """Whether the compiled kernel is loaded in this process; builds / loads it on the first call."""
    if _state['tried']:
        return _state['ok']
    return load()


def error() -> Optional[str]:
    """Why the kernel is not available (None when it is, or when it was not tried yet)."""
    return _state['error']


def build_directory() -> Optional[str]:
    """Where the loaded build lives (None when not loaded)."""
    if not _state['ok']:
        return None
    from torch.utils import cpp_extension
    return cpp_extension._get_build_directory(_state['name'], verbose=False)


def loaded_name() -> Optional[str]:
    """The loaded build's name (its x86-64 level), or None."""
    return _state['name']
