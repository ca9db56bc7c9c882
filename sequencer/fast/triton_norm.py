"""Triton kernels for a block's pre-norm on the GPU: LayerNorm over the last dimension, fused with what
surrounds it in a Sequencer block (``ops.norm_residual``).

Forward (``layer_norm_forward``): one program normalises ``BLOCK_M`` rows of x (float32 statistics) and
writes the output straight in the dtype its consumer computes in: under CUDA autocast the branch's first
product casts its input to float16 / bfloat16 anyway, so the kernel writes that dtype (the values the cast
of a float32 output would give, without writing and re-reading the float32 output). It also writes each
row's mean and 1 / std for the backward.

Backward (``layer_norm_backward``): one program walks a run of rows; per row it computes the input gradient
from the output gradient (read in whatever dtype it arrives in: the low-precision gradient of the branch's
first product under autocast, without a cast to float32 first) and adds the gradient that reached x
through the block's residual, so the sum autograd would make in a separate pass is made here. The weight
and bias gradients are accumulated per program in float32 and summed over programs by one reduction.

Under CUDA autocast the residual stream is bfloat16 (or float16) and LayerNorm runs in float32, so the plain
block casts x to float32, normalises, and casts the result back for the branch's first product; backward,
it casts the gradient up, runs LayerNorm's backward, casts the result down and adds the residual's
gradient. Per element of one pre-norm the kernels move about 4 bytes instead of 20 forward and 8 instead
of about 30 backward, in three kernel launches instead of about eight, for the host time of an autograd
function's Python. The backward's loop over rows is latency-bound on the GPU: ``norm_backward`` takes the rows
per loop step and the warps as arguments. The kernels are tested through Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``), which runs the same kernel source (rounding to bfloat16 as the GPU does: the
interpreter itself truncates, ``RNE``), and on a GPU against plain LayerNorms.
"""
import functools
from typing import Optional, Tuple

import torch

from .runtime import plain_backward
from .triton_lstm import _cdiv, _kernel, _next_pow2, _on, constexpr, tl, triton


def _ln_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, stats_ptr, M, C, eps,
                   BLOCK_M: constexpr, BLOCK_C: constexpr, RNE: constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    mask_m = rows < M
    mask_c = cols < C
    mask = mask_m[:, None] & mask_c[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    if RNE:   # the interpreter truncates to bfloat16: round to nearest even first, as the GPU's conversion does
        bits = y.to(tl.uint32, bitcast=True)
        y = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(stats_ptr + rows, mean, mask=mask_m)        # stats (2, M): the means, then the 1 / std
    tl.store(stats_ptr + M + rows, rstd, mask=mask_m)


def _ln_bwd_kernel(g_ptr, x_ptr, stats_ptr, w_ptr, gres_ptr, dx_ptr, part_ptr, M, C, rows_per_prog,
                   HAS_RES: constexpr, BLOCK_M: constexpr, BLOCK_C: constexpr, RNE: constexpr):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first = pid * rows_per_prog
    for start in range(first, first + rows_per_prog, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask_m = rows < M
        mask = mask_m[:, None] & mask_c[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(stats_ptr + rows, mask=mask_m, other=0.0)
        rstd = tl.load(stats_ptr + M + rows, mask=mask_m, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wg = g * w[None, :]
        c1 = tl.sum(xhat * wg, axis=1) / C
        c2 = tl.sum(wg, axis=1) / C
        dx = (wg - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_RES:
            dx += tl.load(gres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RNE:   # as in the forward
            bits = dx.to(tl.uint32, bitcast=True)
            dx = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(g * xhat, axis=0)
        db += tl.sum(g, axis=0)
    tl.store(part_ptr + pid * C + cols, dw, mask=mask_c)
    tl.store(part_ptr + (P + pid) * C + cols, db, mask=mask_c)


@functools.lru_cache(maxsize=None)
def _blocks(C: int) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_M, num_warps): a row padded to a power of two, about 1024 elements per program step (8 per
    thread of four warps). Compiled for sm_90 (``benchmarks/triton_compile.py``) the backward then needs 72
    registers per thread (about 28 resident warps per SM, for a kernel bound by memory bandwidth), where
    2048-element steps needed 138-149 (12 warps); neither spills. Chosen from those figures, not timed."""
    block_c = max(16, _next_pow2(C))
    return block_c, max(1, min(64, 1024 // block_c)), 4 if block_c <= 512 else 8


def norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                 out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out of x's shape in ``out_dtype``, stats (2, rows): mean and 1 / std) for a contiguous x, normalised
    over its last dimension; no argument checks (``layer_norm_forward`` checks)."""
    C = x.shape[-1]
    M = x.numel() // C
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    stats = torch.empty(2, M, device=x.device, dtype=torch.float32)
    block_c, block_m, warps = _blocks(C)
    interpret = x.device.type != 'cuda'
    with _on(x.device):
        _kernel(_ln_fwd_kernel, interpret)[(_cdiv(M, block_m),)](
            x, weight, bias, out, stats, M, C, eps, BLOCK_M=block_m, BLOCK_C=block_c,
            RNE=interpret and out_dtype == torch.bfloat16, num_warps=warps)
    return out, stats


def norm_backward(g: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, weight: torch.Tensor,
                  g_res: Optional[torch.Tensor], max_programs: int = 1024, block_m: Optional[int] = None,
                  num_warps: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dx of x's shape and dtype, dwb (2, C) float32: the weight and bias gradients) for contiguous g (and
    ``g_res``) of x's shape; no argument checks (``layer_norm_backward`` checks). ``max_programs``,
    ``block_m`` (rows per step of a program's loop, a power of two) and ``num_warps`` override the launch
    configuration (a grid of them can be timed on a GPU)."""
    C = x.shape[-1]
    M = x.numel() // C
    block_c, default_m, default_warps = _blocks(C)
    block_m, warps = block_m or default_m, num_warps or default_warps
    per = _cdiv(_cdiv(M, max_programs), block_m) * block_m   # rows per program: a multiple of BLOCK_M
    P = max(1, _cdiv(M, per))
    dx = torch.empty_like(x)
    part = torch.empty(2, P, C, device=x.device, dtype=torch.float32)
    interpret = x.device.type != 'cuda'
    with _on(x.device):
        _kernel(_ln_bwd_kernel, interpret)[(P,)](
            g, x, stats, weight, g if g_res is None else g_res, dx, part, M, C, per,
            HAS_RES=g_res is not None, BLOCK_M=block_m, BLOCK_C=block_c, RNE=interpret and x.dtype == torch.bfloat16,
            num_warps=warps)
    return dx, part.sum(1)


def _check(x: torch.Tensor, *vectors: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("the Triton LayerNorm needs the 'triton' package")
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError('the Triton LayerNorm takes a contiguous (rows, channels) tensor')
    for v in vectors:
        if v.shape != (x.shape[1],) or not v.is_contiguous() or v.device != x.device:
            raise ValueError('the LayerNorm weight and bias must be contiguous vectors of the channel count')


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (M, C) in ``out_dtype``, mean (M,), rstd (M,) float32): LayerNorm of the rows of x (M, C)."""
    _check(x, weight, bias)
    out, stats = norm_forward(x, weight, bias, eps, out_dtype)
    return out, stats[0], stats[1]


def layer_norm_backward(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        weight: torch.Tensor, g_res: Optional[torch.Tensor] = None,
                        max_programs: int = 1024) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (M, C) in x's dtype, dweight (C,), dbias (C,) float32) for the output gradient g (M, C, any float
    dtype); ``g_res`` (M, C), the gradient reaching x by another path (the residual), is added to dx."""
    _check(x, weight)
    _check(g)
    if g.shape != x.shape or (g_res is not None and (g_res.shape != x.shape or not g_res.is_contiguous())):
        raise ValueError('the LayerNorm gradients must be contiguous and of the shape of x')
    if mean.shape != (x.shape[0],) or rstd.shape != mean.shape:
        raise ValueError('mean and rstd must have one entry per row')
    dx, dwb = norm_backward(g, x, torch.stack([mean, rstd]), weight, g_res, max_programs)
    return (dx, *dwb.unbind())


class NormResidual(torch.autograd.Function):
    """(LayerNorm(x) in ``out_dtype``, x) over the last dimension of a contiguous x: a block's pre-norm and its
    residual, through the Triton kernels; the backward sums the gradients reaching x through both in the
    norm's own kernel. A double backward (``create_graph``) uses LayerNorm's own, differentiable backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        out, stats = norm_forward(x, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, stats, weight, bias)
        return out, x.view_as(x)

    @staticmethod
    def backward(ctx, g_out, g_res):
        x, stats, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if plain_backward(g_out, g_res):   # create_graph or batched gradients
            C = x.shape[-1]
            stat = (*x.shape[:-1], 1)
            f32 = torch.float32 if x.dtype != weight.dtype else x.dtype   # LayerNorm's kernels take one dtype
            dx, dw, db = torch.ops.aten.native_layer_norm_backward(
                g_out.to(f32), x.to(f32), (C,), stats[0].view(stat), stats[1].view(stat), weight.to(f32),
                bias.to(f32), [need_x, need_w, need_b])
            return ((None if dx is None else dx.to(x.dtype) + g_res), None if dw is None else dw.to(weight.dtype),
                    None if db is None else db.to(bias.dtype), None, None)
        dx, dwb = norm_backward(g_out.contiguous(), x, stats, weight, g_res.contiguous())
        dw, db = dwb.unbind()
        return (dx if need_x else None, dw.to(weight.dtype) if need_w else None,
                db.to(bias.dtype) if need_b else None, None, None)
