"""The channel MLP of a Sequencer block (fc1, exact GELU, fc2), fused on CPU in float32.

``Mlp`` is timm's ``Mlp`` (same submodules, so the same state_dict keys) with one change: on CPU, in
float32 without autocast, with the exact GELU, no dropout in effect and no hidden norm, it runs
``fused_mlp`` instead of four separate ops. Everywhere else (other devices and dtypes, autocast,
``torch.compile``, which fuses by itself, TorchScript / ONNX export), and whenever ``fc1``, ``act`` or
``fc2`` carry hooks or are not the plain modules (the fused path does not call them, so hooks such as
the FLOP counter's, or a replaced ``fc1``, keep working), it runs timm's forward.

What the fused path changes, with the same GEMMs:

* **Forward.** fc1 is a GEMM without its bias; one pass of the compiled kernel
  (``sequencer/csrc/mlp_cpu.cpp``) adds the bias, applies the exact GELU in place and, when gradients
  are needed, writes the GELU's derivative beside it. fc2 is the usual ``addmm``. Compared with
  ``addmm`` + ``gelu``, the bias is no longer broadcast into the output before the GEMM, and the
  pre-activation is not kept (it is overwritten).
* **Backward.** The GELU's gradient is one multiplication by the saved derivative (instead of evaluating
  erf and exp again), done in place on fc2's input gradient together with the column sums that give
  fc1's bias gradient; the weight and input gradients are the usual GEMMs.

The kernel's erf is accurate to 1.5e-7 (absolute), so outputs and gradients agree with timm's ``Mlp``
to float32 rounding (the tests check 1e-5). Double backward through the fused path is not supported
(``once_differentiable``). ``fused_lstm.cpu_kernel_disabled()`` and ``SEQUENCER_CPU_KERNEL=0`` turn the
fused path off, like the fused RNN engine's kernel.
"""
import torch
from timm.layers import Mlp as _TimmMlp
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _nn_module

from . import cpu_kernel, fused_lstm


class _FusedMlp(torch.autograd.Function):
    """fc2(GELU(fc1(x))) over x (..., C) with fc1 = (w1, b1), fc2 = (w2, b2); float32 CPU tensors."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        C = x.shape[-1]
        x2 = x.reshape(-1, C)
        a = torch.mm(x2, w1.t())                       # fc1 without its bias ...
        grad = any(ctx.needs_input_grad)
        deriv = torch.empty_like(a) if grad else a.new_empty(0)
        torch.ops.sequencer_mlp.bias_gelu_(a, b1, deriv)  # ... a = GELU(a + b1) in place, deriv = GELU'
        y = torch.addmm(b2, a, w2.t())
        if grad:
            ctx.save_for_backward(x2, w1, w2, a, deriv)
            ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x2, w1, w2, a, deriv = ctx.saved_tensors
        gy = gy.reshape(-1, gy.shape[-1]).contiguous()
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        dw2 = torch.mm(gy.t(), a) if need_w2 else None
        db2 = gy.sum(0) if need_b2 else None
        da = torch.mm(gy, w2)
        db1 = torch.ops.sequencer_mlp.gelu_grad_bias_(da, deriv)   # da <- da * GELU', and its column sums
        dw1 = torch.mm(da.t(), x2) if need_w1 else None
        dx = torch.mm(da, w1).view(ctx.x_shape) if need_x else None
        return dx, dw1, db1 if need_b1 else None, dw2, db2


def fused_mlp(module: '_TimmMlp', x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` through the fused path (see ``Mlp.fusable`` for when it applies)."""
    return _FusedMlp.apply(x, module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias)


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, 'is_exporting', None)   # torch >= 2.5
    return bool(is_exporting and is_exporting())


def _unhooked(*modules: nn.Module) -> bool:
    """No forward / backward hooks on these modules, nor global ones: the fused path does not call them."""
    if (_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
            or _nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in modules)


def _inactive_dropout(m: nn.Module, training: bool) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and (m.p == 0 or not training))


class Mlp(_TimmMlp):
    """timm's ``Mlp`` that runs ``fused_mlp`` where it applies (CPU, float32, exact GELU; see the module doc).

    ``fused = False`` on an instance (or ``sequencer benchmark --no-fused-mlp`` for a whole model) keeps it
    on timm's forward everywhere.
    """

    fused: bool = True

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` takes the fused path."""
        if not self.fused:
            return False
        if x.device.type != 'cpu' or x.dtype != torch.float32 or torch.is_autocast_enabled('cpu'):
            return False
        if torch.compiler.is_compiling() or _exporting() or torch.jit.is_tracing() \
                or torch.onnx.is_in_onnx_export():
            return False
        fc1, fc2 = self.fc1, self.fc2
        if not (type(fc1) is nn.Linear and type(fc2) is nn.Linear and fc1.bias is not None
                and fc2.bias is not None and isinstance(self.norm, nn.Identity)
                and type(self.act) is nn.GELU and self.act.approximate == 'none'
                and _inactive_dropout(self.drop1, self.training) and _inactive_dropout(self.drop2, self.training)
                and _unhooked(fc1, self.act, fc2)):
            return False
        if any(p.dtype != torch.float32 for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)):
            return False
        return not fused_lstm._KERNEL_OFF[0] and cpu_kernel.available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fusable(x):
            return fused_mlp(self, x)
        return super().forward(x)
