"""What the fast modules ask before taking a fast path: the process's switches and the predicates on tensors.

The switches are context managers (per process, nestable):

* ``cpu_kernel_disabled()``: the compiled CPU kernels stand aside; the fused recurrence runs its torch
  implementation and the fused MLP / pre-norm their plain forms (comparisons, tests). ``SEQUENCER_CPU_KERNEL=0``
  in the environment does the same for the whole process.
* ``triton_on_cpu()``: inside ``cpu_kernel_disabled()``, CPU tensors take the GPU path (the Triton kernels,
  run by Triton's interpreter with ``TRITON_INTERPRET=1``), so that the GPU path can be tested without a GPU.
"""
import contextlib
from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from . import cpu_kernel

_switches = {'cpu_kernel_off': 0, 'triton_on_cpu': 0}


@contextlib.contextmanager
def _switched(name: str):
    _switches[name] += 1
    try:
        yield
    finally:
        _switches[name] -= 1


def cpu_kernel_disabled():
    """Within this context the compiled CPU kernels are not used (the torch implementations run instead)."""
    return _switched('cpu_kernel_off')


def triton_on_cpu():
    """Within this context (and ``cpu_kernel_disabled()``), CPU tensors run the GPU path's Triton kernels through
    Triton's interpreter (``TRITON_INTERPRET=1``): tests and smoke runs of the GPU path without a GPU."""
    return _switched('triton_on_cpu')


def cpu_kernel_ok() -> bool:
    """Whether the compiled CPU kernels may run now: not switched off, and built (the first call builds them;
    under torch.compile only a kernel loaded before tracing counts, since tracing never builds it)."""
    if _switches['cpu_kernel_off']:
        return False
    if torch.compiler.is_compiling():
        return cpu_kernel.loaded()
    return cpu_kernel.available()


_TRITON: dict = {}


def triton_ok() -> bool:
    """Whether Triton can run the GPU kernels on CUDA tensors here (triton is an optional dependency)."""
    if 'ok' not in _TRITON:
        try:
            from . import triton_lstm
            _TRITON['ok'] = triton_lstm.available()
        except Exception:   # a broken Triton install: the GPU path is then cuDNN / torch ops
            _TRITON['ok'] = False
    return _TRITON['ok']


def gpu_path(x: torch.Tensor) -> bool:
    """Whether x takes the GPU path's kernels: a CUDA tensor, or a CPU tensor inside ``triton_on_cpu()`` and
    ``cpu_kernel_disabled()`` (tests)."""
    return x.is_cuda or bool(_switches['triton_on_cpu'] and _switches['cpu_kernel_off'])


def triton_on_cpu_active() -> bool:
    return bool(_switches['triton_on_cpu'])


# ---- autograd Functions where nothing is recorded -----------------------------------------------------------

class _Unrecorded:
    """The ``ctx`` of an autograd Function's forward run outside autograd: no input needs a gradient, and what
    the forward would save or mark is dropped."""

    def __init__(self, n_inputs: int):
        self.needs_input_grad = (False,) * n_inputs

    def save_for_backward(self, *tensors):
        pass

    def mark_dirty(self, *tensors):
        pass


def apply(fn, *args):
    """``fn.apply(*args)`` for an autograd Function whose forward takes a ``record`` flag (records nothing without
    it). Where no graph can be recorded (grad mode off, no forward-mode AD, not traced), ``fn.forward`` runs
    directly: the same tensors, without the Function's bookkeeping (about 15 us per call; see
    ``benchmarks/call_overhead.py``)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or functorch_active():
        return fn.apply(*args)
    return fn.forward(_Unrecorded(len(args)), *args)


def _forward_ad_level() -> int:
    """The innermost open ``forward_ad.dual_level`` (-1: none)."""
    return getattr(torch.autograd.forward_ad, '_current_level', -1)


# ---- autocast ------------------------------------------------------------------------------------------

def _has_autocast(device_type: str) -> bool:
    """Whether autocast exists for this device type (not for 'meta', where asking raises). CPU and CUDA are
    answered without ``torch.amp.is_autocast_available``, which torch.compile could not trace in torch 2.11."""
    if device_type in ('cpu', 'cuda'):
        return True
    available = getattr(torch.amp, 'is_autocast_available', None)
    return available is None or available(device_type)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs this device type's ops in, or None: autocast off, or no autocast there."""
    if not (_has_autocast(device_type) and torch.is_autocast_enabled(device_type)):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_off(device_type: str):
    """A context that turns autocast off for this device type (a no-op where it has no autocast)."""
    return torch.autocast(device_type, enabled=False) if _has_autocast(device_type) else contextlib.nullcontext()


# ---- when the plain forward must run ----------------------------------------------------------------------

def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, 'is_exporting', None)   # torch >= 2.5
    return bool(is_exporting and is_exporting())


def _fx_tracing() -> bool:
    trace = getattr(torch.fx, '_symbolic_trace', None)
    is_tracing = getattr(trace, 'is_fx_symbolic_tracing', None) or getattr(trace, 'is_fx_tracing', None)
    return bool(is_tracing and is_tracing())


def functorch_active() -> bool:
    """A torch.func transform (grad, vmap, jvp, ...) or a forward-mode AD level (``torch.autograd.forward_ad``) in
    progress: the fast paths' autograd functions and compiled kernels support neither (tangents would be dropped),
    so the plain ops run."""
    active = getattr(torch._C, '_are_functorch_transforms_active', None)
    return bool(active and active()) or _forward_ad_level() >= 0


def plain_backward(*grads: Optional[torch.Tensor]) -> bool:
    """Whether a fused function's backward must run plain, differentiable and batchable ops: under
    ``create_graph`` (a double backward), or with batched gradients (``autograd.grad(..., is_grads_batched=True)``,
    ``jacobian`` / ``hessian`` with ``vectorize=True``), which the compiled kernels and oneDNN ops do not
    support."""
    if torch.is_grad_enabled():
        return True
    if torch.compiler.is_compiling():   # a traced backward: no batched gradients there
        return False
    legacy = getattr(torch._C._functorch, 'is_legacy_batchedtensor', None)   # what is_grads_batched hands over
    return bool(legacy) and any(g is not None and legacy(g) for g in grads)


def recompute_leaves(tensors, needs):
    """The tensors a ``plain_backward`` recomputation differentiates: themselves under ``create_graph`` (the
    gradients stay linked to them), detached leaves otherwise (batched gradients: values only)."""
    if torch.is_grad_enabled():
        return list(tensors)
    return [t if t is None else t.detach().requires_grad_(bool(need)) for t, need in zip(tensors, needs)]


def tracing() -> bool:
    """torch.compile, export, TorchScript or FX tracing, ONNX export, or a torch.func transform in progress."""
    return (torch.compiler.is_compiling() or _exporting() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export() or _fx_tracing() or functorch_active())


def exporting_graph() -> bool:
    """Tracing for an exported graph (TorchScript tracing, ONNX, torch.export), not for torch.compile: such graphs
    need the standard ops."""
    # non-strict torch.export (and the dynamo ONNX exporter) also reports is_compiling()
    return _exporting() or ((not torch.compiler.is_compiling())
                            and (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or _fx_tracing()))


def cpu_float32(*tensors: torch.Tensor) -> bool:
    return (not torch.is_autocast_enabled('cpu')
            and all(t.device.type == 'cpu' and t.dtype == torch.float32 for t in tensors))


def unhooked(*modules: nn.Module) -> bool:
    """No forward / backward hooks on these modules, nor global ones: a fused path does not call the modules it
    fuses, so hooks (the FLOP counter's, a user's) must see the plain forward."""
    if (_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
            or _nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in modules)
