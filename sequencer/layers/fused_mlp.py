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
* **Residual.** ``forward(x, residual)`` returns ``residual + MLP(x)`` (``SequencerBlock`` hands its
  residual add over this way): fc2's GEMM accumulates onto ``residual + b2`` with ``addmm_``, so the
  add makes no pass of its own. ``linear_residual`` does the same for any plain ``nn.Linear`` (the
  BiLSTM2D's fusing ``fc``).
* **Pre-norm.** ``norm_residual(norm, x)`` returns ``(norm(x), x)``; when gradients are needed, the
  gradient that reaches x through the LayerNorm and through the residual is summed inside LayerNorm's
  backward (the compiled ``sequencer/csrc/norm_cpu.cpp``), instead of in a separate pass by autograd.

The kernel's erf is accurate to 1.5e-7 (absolute), so outputs and gradients agree with timm's ``Mlp``
to float32 rounding (the tests check 1e-5). Double backward through the fused path is not supported
(``once_differentiable``). ``fused_lstm.cpu_kernel_disabled()`` and ``SEQUENCER_CPU_KERNEL=0`` turn the
fused path off, like the fused RNN engine's kernel.
"""
from typing import Optional, Tuple

import torch
from timm.layers import Mlp as _TimmMlp
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _nn_module

from . import cpu_kernel, fused_lstm


class _FusedMlp(torch.autograd.Function):
    """[residual +] fc2(GELU(fc1(x))) over x (..., C) with fc1 = (w1, b1), fc2 = (w2, b2); float32 CPU tensors.
    With ``into``, residual already holds b2 (b2 is None) and is accumulated onto in place."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, residual, into=False):
        C = x.shape[-1]
        x2 = x.reshape(-1, C)
        a = torch.mm(x2, w1.t())                       # fc1 without its bias ...
        grad = any(ctx.needs_input_grad)
        deriv = torch.empty_like(a) if grad else a.new_empty(0)
        torch.ops.sequencer_mlp.bias_gelu_(a, b1, deriv)  # ... a = GELU(a + b1) in place, deriv = GELU'
        if grad:
            ctx.save_for_backward(x2, w1, w2, a, deriv)
            ctx.x_shape = x.shape
        if residual is None:
            y = torch.addmm(b2, a, w2.t())
        elif into:                                     # residual already holds b2: accumulate in place
            residual.view(-1, w2.shape[0]).addmm_(a, w2.t())
            ctx.mark_dirty(residual)
            return residual
        else:                                          # the GEMM accumulates onto residual + b2
            y = torch.add(residual.reshape(-1, w2.shape[0]), b2).addmm_(a, w2.t())
        return y.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x2, w1, w2, a, deriv = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2, need_res = ctx.needs_input_grad[:6]
        dres = gy if need_res else None
        gy = gy.reshape(-1, gy.shape[-1]).contiguous()
        dw2 = torch.mm(gy.t(), a) if need_w2 else None
        db2 = gy.sum(0) if need_b2 else None
        da = torch.mm(gy, w2)
        db1 = torch.ops.sequencer_mlp.gelu_grad_bias_(da, deriv)   # da <- da * GELU', and its column sums
        dw1 = torch.mm(da.t(), x2) if need_w1 else None
        dx = torch.mm(da, w1).view(ctx.x_shape) if need_x else None
        return dx, dw1, db1 if need_b1 else None, dw2, db2, dres, None


def fused_mlp(module: '_TimmMlp', x: torch.Tensor, residual: Optional[torch.Tensor] = None,
              bias_in_residual: bool = False) -> torch.Tensor:
    """``module(x)``, or ``residual + module(x)``, through the fused path (see ``Mlp.fusable``). With
    ``bias_in_residual``, ``residual`` already holds fc2's bias and is accumulated onto in place."""
    if bias_in_residual:
        return _FusedMlp.apply(x, module.fc1.weight, module.fc1.bias, module.fc2.weight, None, residual, True)
    return _FusedMlp.apply(x, module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias, residual)


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, 'is_exporting', None)   # torch >= 2.5
    return bool(is_exporting and is_exporting())


def _fx_tracing() -> bool:
    trace = getattr(torch.fx, '_symbolic_trace', None)
    is_tracing = getattr(trace, 'is_fx_symbolic_tracing', None) or getattr(trace, 'is_fx_tracing', None)
    return bool(is_tracing and is_tracing())


def _functorch_active() -> bool:
    """A torch.func transform (grad, vmap, jvp, ...) in progress: the fused paths' autograd functions do not
    support them, so they step aside for the plain ops."""
    active = getattr(torch._C, '_are_functorch_transforms_active', None)
    return bool(active and active())


def _tracing() -> bool:
    """torch.compile, export, TorchScript or FX tracing, ONNX export, or a torch.func transform in progress."""
    return (torch.compiler.is_compiling() or _exporting() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export() or _fx_tracing() or _functorch_active())


def _cpu_float32(*tensors: torch.Tensor) -> bool:
    return (not torch.is_autocast_enabled('cpu')
            and all(t.device.type == 'cpu' and t.dtype == torch.float32 for t in tensors))


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
        if not _cpu_float32(x) or _tracing():
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

    def residual_bias(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """fc2's bias where the fused path would run on x: a residual that already holds it is then accumulated
        onto in place (``forward(x, residual, bias_in_residual=True)``); else None."""
        return self.fc2.bias if self.fusable(x) else None

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                bias_in_residual: bool = False) -> torch.Tensor:
        """``MLP(x)``, or ``residual + MLP(x)`` when ``residual`` is given (see ``SequencerBlock``).

        ``bias_in_residual=True`` (only where ``residual_bias(x)`` is not None): ``residual`` already holds
        fc2's bias, and the result is accumulated onto it in place (the caller's fresh tensor).
        """
        res_ok = residual is None or (_cpu_float32(residual)
                                      and residual.shape == (*x.shape[:-1], self.fc2.out_features))
        if bias_in_residual:
            if residual is None or not (self.fusable(x) and res_ok and residual.is_contiguous()):
                raise ValueError('Mlp: bias_in_residual needs a float32 CPU residual of the output shape and '
                                 'the fused path (see residual_bias)')
            return fused_mlp(self, x, residual, bias_in_residual=True)
        if self.fusable(x) and res_ok:
            return fused_mlp(self, x, residual)
        y = super().forward(x)
        return y if residual is None else residual + y

    takes_residual = True   # forward(x, residual) is residual + forward(x)

    def casts_input(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` reads x only through a plain, hook-free ``fc1`` (under autocast: only its cast
        to the autocast dtype), so that a pre-norm may hand x over in that dtype."""
        return type(self.fc1) is nn.Linear and _unhooked(self, self.fc1)


class _NormResidual(torch.autograd.Function):
    """(LayerNorm(x), x [+ r_bias]) over the last dimension: the pre-norm of a block and its residual, whose
    gradients the backward sums in the same pass as LayerNorm's own backward (the compiled kernel). With
    ``r_bias`` (the bias of the branch's last linear layer), the forward is one kernel pass too, and the
    backward sums r_bias's gradient while it reads the residual's."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, r_bias):
        C = x.shape[-1]
        if r_bias is None:
            out, mean, rstd = torch.native_layer_norm(x, (C,), weight, bias, eps)
            res = x.view_as(x)
        else:
            out, mean, rstd, res = torch.ops.sequencer_norm.layer_norm_residual_bias(x, weight, bias, eps, r_bias)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        return out, res

    @staticmethod
    def backward(ctx, g_out, g_res):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        want_rb = ctx.needs_input_grad[4]
        if torch.is_grad_enabled():   # create_graph (double backward): LayerNorm's own, differentiable backward
            dx, dw, db = torch.ops.aten.native_layer_norm_backward(
                g_out, x, (x.shape[-1],), mean, rstd, weight, bias, list(ctx.needs_input_grad[:3]))
            drb = g_res.reshape(-1, x.shape[-1]).sum(0) if want_rb else None
            return (None if dx is None else dx + g_res), dw, db, None, drb
        dx, dw, db, drb = torch.ops.sequencer_norm.layer_norm_backward_residual(
            g_out.contiguous(), x, mean, rstd, weight, g_res.contiguous(), want_rb)
        return dx, dw, db, None, (drb if want_rb else None)


def norm_residual(norm: nn.Module, x: torch.Tensor, r_bias: Optional[torch.Tensor] = None,
                  lowp_out: bool = False, gpu_kernels: bool = True,
                  cpu_kernels: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x), x)``, or ``(norm(x), x + r_bias)``: a block's pre-norm and its residual.

    On CPU in float32 with a plain, hook-free ``nn.LayerNorm`` over the last dimension, the compiled kernel
    writes ``x + r_bias`` in the same pass as the norm, and when gradients are needed, the gradient reaching
    x through both (and r_bias's) is computed in one pass (``_NormResidual``; a double backward uses
    LayerNorm's own backward). ``x + r_bias`` is always a fresh tensor, which the branch may accumulate onto
    in place. ``cpu_kernels=False`` leaves this out.

    On CUDA with Triton (and ``gpu_kernels``), without ``r_bias``, the Triton kernels of ``triton_norm`` do
    the same for the norm and the residual's gradient; with ``lowp_out`` (the caller's branch uses its input
    only through a cast to the autocast dtype) the output is written in that dtype under autocast, else in
    the dtype ``norm(x)`` would have.
    """
    C = x.shape[-1]
    if gpu_kernels and r_bias is None and fused_lstm.gpu_path(x):
        out_dtype = _gpu_norm_dtype(norm, x, lowp_out)
        if out_dtype is not None:
            from .triton_norm import NormResidual, norm_forward
            w, b = norm.weight, norm.bias
            if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or b.requires_grad):
                return NormResidual.apply(x, w, b, norm.eps, out_dtype)
            return norm_forward(x, w, b, norm.eps, out_dtype)[0], x
        return norm(x), x
    fusable = (cpu_kernels and not _tracing() and type(norm) is nn.LayerNorm and norm.weight is not None
               and norm.bias is not None and tuple(norm.normalized_shape) == (C,) and x.is_contiguous()
               and norm.weight.is_contiguous() and norm.bias.is_contiguous()
               and _cpu_float32(x, norm.weight, norm.bias) and _unhooked(norm)
               and (r_bias is None or (_cpu_float32(r_bias) and r_bias.shape == (C,) and r_bias.is_contiguous()))
               and not fused_lstm._KERNEL_OFF[0] and cpu_kernel.available())
    if fusable:
        params = (norm.weight, norm.bias) if r_bias is None else (norm.weight, norm.bias, r_bias)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return _NormResidual.apply(x, norm.weight, norm.bias, norm.eps, r_bias)
        if r_bias is not None:
            out, _, _, res = torch.ops.sequencer_norm.layer_norm_residual_bias(
                x, norm.weight, norm.bias, norm.eps, r_bias)
            return out, res
    return norm(x), (x if r_bias is None else (x + r_bias).contiguous())


_TRITON_NORM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _gpu_norm_dtype(norm: nn.Module, x: torch.Tensor, lowp_out: bool) -> Optional[torch.dtype]:
    """The output dtype of the Triton LayerNorm on x, or None where it does not run: it needs a plain, hook-free
    ``nn.LayerNorm`` over the last dimension (at most 8192 channels: a program holds a whole row) with weight
    and bias, contiguous tensors of one device in float32 / bfloat16 / float16, outside traced graphs, and
    Triton on CUDA (or the interpreter's CPU tensors in tests). Under autocast the output is the autocast dtype
    with ``lowp_out``, else float32 on CUDA (autocast runs LayerNorm in float32) and x's dtype elsewhere (as
    ``F.layer_norm``)."""
    w, b = norm.weight, norm.bias
    if not (type(norm) is nn.LayerNorm and w is not None and b is not None and x.dtype in _TRITON_NORM_DTYPES
            and w.dtype in _TRITON_NORM_DTYPES and b.dtype == w.dtype and norm.normalized_shape == x.shape[-1:]
            and x.shape[-1] <= 8192 and x.is_contiguous() and w.is_contiguous() and b.is_contiguous()
            and w.device == x.device and b.device == x.device and x.numel() > 0 and _unhooked(norm)
            and not _tracing()):
        return None
    if x.is_cuda and not fused_lstm._triton_ok():
        return None
    amp = fused_lstm.autocast_dtype(x.device.type)
    if amp is None:
        return x.dtype
    return amp if lowp_out else (torch.float32 if x.is_cuda else x.dtype)


class _AddmmInto(torch.autograd.Function):
    """``residual += x @ weight.T`` in place on a fresh 2-D-reshapable residual: a linear layer whose bias the
    residual already holds (see ``linear_residual``)."""

    @staticmethod
    def forward(ctx, residual, x, weight):
        x2 = x.reshape(-1, x.shape[-1])
        residual.view(-1, weight.shape[0]).addmm_(x2, weight.t())
        ctx.mark_dirty(residual)
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        return residual

    @staticmethod
    def backward(ctx, g):
        x2, weight = ctx.saved_tensors
        g2 = g.reshape(-1, weight.shape[0])
        dx = torch.mm(g2, weight).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        dw = torch.mm(g2.t(), x2) if ctx.needs_input_grad[2] else None
        return g, dx, dw


def linear_into_ok(fc: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``linear_residual(fc, x, residual, bias_in_residual=True)`` may run: a plain, hook-free
    ``nn.Linear`` with a bias, CPU float32, not traced."""
    return (type(fc) is nn.Linear and fc.bias is not None and _cpu_float32(x, fc.weight, fc.bias)
            and not _tracing() and _unhooked(fc) and not fused_lstm.gpu_path(x))


def linear_residual(fc: nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor],
                    bias_in_residual: bool = False) -> torch.Tensor:
    """``fc(x)``, or ``residual + fc(x)`` when ``residual`` is given.

    On CPU in float32 (no autocast, no tracing) with a plain, hook-free ``nn.Linear``, the sum is one
    ``addmm_`` accumulating onto ``residual + bias``: the residual add no longer makes a pass of its own.
    With ``bias_in_residual`` (where ``linear_into_ok``), ``residual`` already holds fc's bias (see
    ``norm_residual``) and is accumulated onto in place.
    """
    if bias_in_residual:
        if (residual is None or not linear_into_ok(fc, x) or not residual.is_contiguous()
                or residual.shape != (*x.shape[:-1], fc.out_features)):
            raise ValueError('linear_residual: bias_in_residual needs a plain nn.Linear with a bias, CPU float32 '
                             'tensors and a residual of the output shape')
        return _AddmmInto.apply(residual, x, fc.weight)
    if residual is None:
        return fc(x)
    if (linear_into_ok(fc, x) and _cpu_float32(residual)
            and residual.shape == (*x.shape[:-1], fc.out_features)):
        out = torch.add(residual.reshape(-1, fc.out_features), fc.bias)
        return out.addmm_(x.reshape(-1, fc.in_features), fc.weight.t()).view(residual.shape)
    return residual + fc(x)
