"""The fused engine of ``RNN2D``: all LSTM directions of a BiLSTM2D computed together.

``fused_rnn2d(module, x)`` returns exactly what ``module._forward_native(x)`` returns (the united output,
before ``module.fc``) for single-layer LSTMs, from the same ``nn.LSTM`` parameters, so checkpoints and
state_dicts do not depend on the engine.

How it computes, for D directions (up to four: vertical / horizontal x forward / backward) of hidden
size ``h`` over an NHWC input ``x`` of shape (B, H, W, C):

* **One input GEMM.** The input weights of all directions are stacked into one (D*4h, C) matrix with
  ``b_ih + b_hh`` folded into its bias, and ``x`` (viewed as (B*H*W, C), no copy) is multiplied once:
  ``xp`` of shape (B*H*W, D*4h). Row ``token * D + d`` of ``xp`` viewed as (B*H*W*D, 4h) holds the input
  gates of direction ``d`` at that token.
* **One batched step for all directions.** The recurrent state is (D, N, h): direction ``d`` holds its
  N independent sequences (N = B*W columns for the vertical directions, B*H rows for the horizontal
  ones). A precomputed index table ``rows[t]`` maps step ``t`` of every sequence of every direction to
  its token row, with the reversed directions reading ``T - 1 - t`` -- index arithmetic, no flipped or
  permuted copies. The input gates are gathered into step order once (one ``index_select``); each step
  then adds ``h @ W_hh`` for all directions with one ``baddbmm`` and applies the cell in six element-wise
  ops; the hidden states come back to token order with one more gather, straight into the output
  tensor, which therefore is in the ``cat`` layout (B, H, W, D*h) with no permute or concatenation.
  When H != W the shorter axis is padded: its missing steps and sequences read a zero row, their
  results are never gathered back, and their gradients are exactly zero.
* **Hand-written backward.** Only the (dh, dc) recursion runs step by step (the output gradient gathered
  into step order once; per step one ``baddbmm`` for ``dG @ W_hh`` and element-wise ops). The gate gradients of all
  steps are collected in token order, so the input gradient and ``dW_ih`` are one GEMM each over all
  tokens, the bias gradient one reduction, and ``dW_hh`` one batched GEMM over all time steps.

Internally the gates are ordered (i, f, o, g) and the g rows of the weights are scaled by -2, so that a
single sigmoid over all gates gives i, f, o and ``s = sigmoid(-2 a)``, from which ``tanh(a) = 1 - 2 s``;
``tanh(c)`` is computed the same way. (On CPU ``sigmoid`` is several times faster than ``tanh``.) The
results agree with ``nn.LSTM`` to float32 rounding (about 1e-6).

Numerics under autocast: the input projection runs in the autocast dtype (as a Linear layer would);
the recurrence (state, cell, recurrent matmul) runs in float32; the output is returned in the autocast
dtype, which is what ``nn.LSTM`` returns under autocast. The recurrence's gradients are computed in float32; the
input gradient and ``dW_ih`` are GEMMs in the autocast dtype on the gate gradients (on CPU and GPU alike, as a
Linear layer's backward under autocast), and gradients are returned in the dtypes of the input and the
parameters.

On CPU in float32 the recurrence runs in a compiled kernel (``sequencer/fast/csrc/lstm2d_cpu.cpp``, built on
first use by ``cpu_kernel``): one call per BiLSTM2D runs every step of every direction, the cell is one
fused, vectorised pass that reads the input gates and writes the output at each token's position (so
the gathers of the torch implementation disappear too), the bias is added there (the input GEMM has no
broadcast copy), and the gates keep nn.LSTM's order. Under autocast it reads the input projections in the
autocast dtype and writes the gate gradients in it (no float32 copies). Its backward writes the gate gradients in token
order, and the input / weight gradients are the same single GEMMs as below. Its ops stay in
torch.compile graphs when the kernel was loaded before tracing. The torch implementation documented
here runs in float64, inside ``cpu_kernel_disabled()``, where the kernel cannot be built, and under
torch.compile when it was not loaded.

On CUDA with Triton available the recurrence runs in two Triton kernels (``triton_lstm``, forward and
backward), in ``nn.LSTM``'s own weight layout; the input projection and the input / weight gradients are
single GEMMs in the autocast dtype (bf16 / fp16 tensor cores) or float32, while the cell state stays
float32. The kernels are torch ops, so compiled graphs keep them (``_forward_triton``).
"""
import threading
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from . import gemm
from .runtime import (
    apply,
    autocast_dtype,
    autocast_off,
    cpu_kernel_ok,
    gpu_path,
    plain_backward,
    recompute_leaves,
    triton_ok,
    triton_on_cpu_active,
)

# internal gate order (i, f, o, g) taken from nn.LSTM's (i, f, g, o); the map is its own inverse
_GATE_ORDER = (0, 1, 3, 2)
_G_SCALE = -2.0


# ---- the index plan -------------------------------------------------------------------------------------

def _build_plan(B: int, H: int, W: int, kinds: Tuple[Tuple[bool, bool], ...], device):
    """Index tables of the recurrence over a (B, H, W) grid for the directions ``kinds`` ((vertical, reverse)).

    rows (T, D*N): the token row ``token * D + d`` read and written by step t of sequence n of direction d
    (T, N: the longest sequence and the largest number of sequences over the directions). Steps and
    sequences that a direction lacks (H != W) point to row ``B*H*W*D``: a zero row of the input gates and a
    scratch row of the output.
    prev (B*H*W*D,): for every token row, the row holding the same direction's hidden state one step
    earlier, or ``B*H*W*D`` (a zero row) at the first step.
    inv (B*H*W*D,): the inverse of ``rows``: for every token row, its position ``(t * D + d) * N + n`` in
    step order (so results in step order are brought back to token order with a gather, not a scatter).
    padded: whether any step or sequence is missing (only when H != W and both axes are present).
    """
    D = len(kinds)
    T = max(H if v else W for v, _ in kinds)
    N = max(B * W if v else B * H for v, _ in kinds)
    R = B * H * W * D
    t = torch.arange(T, device=device).view(T, 1)
    n = torch.arange(N, device=device).view(1, N)
    b3 = torch.arange(B, device=device).view(B, 1, 1)
    i3 = torch.arange(H, device=device).view(1, H, 1)
    j3 = torch.arange(W, device=device).view(1, 1, W)
    rows, prev = [], []
    padded = any((H if v else W) != T or (B * W if v else B * H) != N for v, _ in kinds)
    for d, (vertical, reverse) in enumerate(kinds):
        L, M = (H, W) if vertical else (W, H)   # steps per sequence, sequences per image
        s = (L - 1 - t) if reverse else t       # reversed directions: index arithmetic, no flip
        b, k = n // M, n % M
        token = (b * H + s) * W + k if vertical else (b * H + k) * W + s
        valid = (t < L) & (n < B * M)
        rows.append(torch.where(valid, token * D + d, torch.full_like(token, R)))
        step = -1 if not reverse else 1         # where the previous step of this direction was
        pi, pj = (i3 + step, j3) if vertical else (i3, j3 + step)
        ok = (pi >= 0) & (pi < H) & (pj >= 0) & (pj < W)
        ptoken = (b3 * H + pi) * W + pj
        prev.append(torch.where(ok, ptoken * D + d, torch.full_like(ptoken, R)).expand(B, H, W).reshape(-1))
    rows = torch.stack(rows, 1).reshape(T, D * N)
    inv = torch.empty(R + 1, dtype=rows.dtype, device=device)
    inv[rows.view(-1)] = torch.arange(T * D * N, device=device)
    return rows, inv[:R], torch.stack(prev, 1).reshape(R), padded


_PLANS: Dict[tuple, tuple] = {}


def _plan(B, H, W, kinds, device):
    if torch.compiler.is_compiling():
        return _build_plan(B, H, W, kinds, device)
    key = (B, H, W, kinds, str(device))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 64:
            _PLANS.clear()
        plan = _PLANS[key] = _build_plan(B, H, W, kinds, device)
    return plan


# ---- weights in the internal layout --------------------------------------------------------------------

def _gate_scale(hidden: int, device, dtype) -> torch.Tensor:
    s = torch.ones(4, 1, device=device, dtype=dtype)
    s[3] = _G_SCALE
    return s


def _to_internal(w: torch.Tensor, hidden: int) -> torch.Tensor:
    """(4h, ...) in nn.LSTM gate order -> (4h, ...) in the internal order with the g rows scaled."""
    w4 = w.reshape(4, hidden, -1)[list(_GATE_ORDER)]
    return (w4 * _gate_scale(hidden, w.device, w.dtype).view(4, 1, 1)).reshape(w.shape)


def _from_internal(g: torch.Tensor, hidden: int) -> torch.Tensor:
    """Gradient w.r.t. an internal (4h, ...) tensor -> gradient w.r.t. the nn.LSTM parameter."""
    g4 = (g.reshape(4, hidden, -1) * _gate_scale(hidden, g.device, g.dtype).view(4, 1, 1))
    return g4[list(_GATE_ORDER)].reshape(g.shape)


# ---- the recurrence, torch implementation ---------------------------------------------------------------

def _recurrence_torch(xp_rows, w_hh_t, rows, inv, D, N, hidden, out_rows, save):
    """Run all steps. xp_rows (R, 4h) input gates by token row; w_hh_t (D, h, 4h) internal recurrent weights.

    The input gates are gathered into step order once (one ``index_select``), every step then updates its
    slice in place, and the hidden states of all steps are gathered into out_rows (R, h) at the end (one
    ``index_select`` through ``inv``): the loop itself runs seven ops per step. With ``save`` returns what the backward
    needs: act (T, D, N, 4h) gate activations, cs (T, D, N, h) cell states and sc (T, D, N, h)
    sigmoid(-2c).
    """
    T = rows.shape[0]
    G = 4 * hidden
    dev, dt = xp_rows.device, xp_rows.dtype

    def new(*shape):
        return torch.empty(*shape, device=dev, dtype=dt)

    act = xp_rows.index_select(0, rows.view(-1)).view(T, D, N, G)   # input gates in step order
    hs = new(T, D, N, hidden)
    if save:
        cs, sc = new(T, D, N, hidden), new(T, D, N, hidden)
    else:
        sc_buf = new(D, N, hidden)
        c_bufs = (new(D, N, hidden), new(D, N, hidden))
    h_prev = c_prev = None
    for t in range(T):
        g = act[t]
        if h_prev is not None:
            g.baddbmm_(h_prev, w_hh_t)                                # + h @ W_hh, all directions at once
        g.sigmoid_()
        i, f, o, s = g[..., :hidden], g[..., hidden:2 * hidden], g[..., 2 * hidden:3 * hidden], g[..., 3 * hidden:]
        c = cs[t] if save else c_bufs[t % 2]
        if c_prev is None:
            torch.addcmul(i, i, s, value=-2.0, out=c)                  # c = i g, g = 1 - 2 s
        else:
            torch.addcmul(torch.addcmul(i, f, c_prev), i, s, value=-2.0, out=c)  # c = f c + i g
        sct = sc[t] if save else sc_buf
        torch.mul(c, -2.0, out=sct)
        sct.sigmoid_()                                                # tanh(c) = 1 - 2 sigmoid(-2c)
        h = hs[t]
        torch.addcmul(o, o, sct, value=-2.0, out=h)                   # h = o tanh(c)
        h_prev, c_prev = h, c
    torch.index_select(hs.view(-1, hidden), 0, inv, out=out_rows)
    return (act, cs, sc) if save else None


def _backward_torch(gy_rows, act, cs, sc, w_hh, rows, inv, D, N, hidden, dxp_rows):
    """BPTT of the (dh, dc) recursion; writes the internal gate gradients of every step into dxp_rows (R, 4h).

    gy_rows (R, h) output gradient by token row; w_hh (D, 4h, h) internal recurrent weights. The output
    gradient is gathered into step order once, and the gate gradients are gathered back to token order
    once (through ``inv``).
    """
    T = rows.shape[0]
    G = 4 * hidden
    dev, dt = gy_rows.device, gy_rows.dtype

    def new(*shape):
        return torch.empty(*shape, device=dev, dtype=dt)

    gys = gy_rows.index_select(0, rows.view(-1)).view(T, D, N, hidden)   # output gradient in step order
    dD = new(D, N, G)
    dGs = new(T, D, N, G)
    dc_next = dG_next = None
    compiling = torch.compiler.is_compiling()
    for t in range(T - 1, -1, -1):
        if dG_next is not None:
            dh = torch.baddbmm(gys[t], dG_next, w_hh)                 # dy_t + dG_{t+1} @ W_hh
        else:
            dh = gys[t]
        a = act[t]
        i, f, s = a[..., :hidden], a[..., hidden:2 * hidden], a[..., 3 * hidden:]
        o = a[..., 2 * hidden:3 * hidden]
        sct = sc[t]
        # dc = dc_next + dh o (1 - tanh(c)^2), with 1 - tanh(c)^2 = 4 sc (1 - sc)
        q = torch.addcmul(sct, sct, sct, value=-1.0)
        p = dh * o
        dc = p.mul_(q).mul_(4.0) if dc_next is None else torch.addcmul(dc_next, p, q, value=4.0)
        # gradients w.r.t. the activations (i, f, o, s_g) ...
        m2dc = dc * -2.0
        if compiling:  # torch.compile cannot trace out= into slices: the same in functional form
            df = dc * cs[t - 1] if t > 0 else torch.zeros_like(dc)
            dD = torch.cat([torch.addcmul(dc, m2dc, s), df, torch.addcmul(dh, dh, sct, value=-2.0), m2dc * i], -1)
        else:
            torch.addcmul(dc, m2dc, s, out=dD[..., :hidden])                              # di = dc g
            if t > 0:
                torch.mul(dc, cs[t - 1], out=dD[..., hidden:2 * hidden])                  # df = dc c_prev
            else:
                dD[..., hidden:2 * hidden].zero_()
            torch.addcmul(dh, dh, sct, value=-2.0, out=dD[..., 2 * hidden:3 * hidden])    # do = dh tanh(c)
            torch.mul(m2dc, i, out=dD[..., 3 * hidden:])                                  # ds_g = -2 dc i
        dc_next = dc.mul_(f)
        # ... and through the sigmoids: dG = dD s (1 - s)
        u = dD.mul_(a)
        dGt = dGs[t]
        torch.addcmul(u, u, a, value=-1.0, out=dGt)
        dG_next = dGt
    torch.index_select(dGs.view(-1, G), 0, inv, out=dxp_rows)


class _FusedLSTM2D(torch.autograd.Function):
    """Autograd function over x (B, H, W, C) and the flat list of (w_ih, w_hh, b_ih, b_hh) per direction."""

    @staticmethod
    def forward(ctx, x, kinds, hidden, out_dtype, mm_dtype, record, *params):
        # record: whether autograd records this call (grad mode was on at apply; needs_input_grad alone does not
        # say, it follows the inputs' requires_grad even under no_grad); without it nothing is kept for a backward
        ctx.record = record
        if record:   # for a double backward, which differentiates a plain recomputation (``_plain_rnn2d``)
            ctx.plain = (kinds, hidden, params)   # (x: the first saved tensor of every path)
        B, H, W, C = x.shape
        D = len(kinds)
        G = 4 * hidden
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32   # recurrence dtype
        ctx.kernel = cdt == torch.float32 and x.device.type == 'cpu' and cpu_kernel_ok()
        if ctx.kernel:
            return _forward_cpu_kernel(ctx, x, kinds, hidden, out_dtype, mm_dtype, params)
        ctx.triton = _use_triton(x, cdt, hidden, mm_dtype)
        if ctx.triton:
            return _forward_triton(ctx, x, kinds, hidden, out_dtype, mm_dtype, params)
        with autocast_off(x.device.type):
            rows, inv, prev, padded = _plan(B, H, W, kinds, x.device)
            T, DN = rows.shape
            N = DN // D
            has_bias = params[2] is not None
            w_ih = torch.cat([_to_internal(params[4 * d].to(cdt), hidden) for d in range(D)])       # (D*4h, C)
            w_hh = torch.stack([_to_internal(params[4 * d + 1].to(cdt), hidden) for d in range(D)])  # (D, 4h, h)
            bias = torch.cat([_to_internal((params[4 * d + 2] + params[4 * d + 3]).to(cdt), hidden)
                              for d in range(D)]) if has_bias else None
            R = B * H * W * D
            x2 = x.reshape(B * H * W, C)
            # one extra row: the zero input gates of padded steps
            xp_buf = torch.empty(R + 1, G, device=x.device, dtype=cdt)
            xp = xp_buf[:R].view(B * H * W, D * G)
            if mm_dtype == cdt and x2.dtype == cdt:
                if bias is None:
                    torch.mm(x2, w_ih.t(), out=xp)
                else:
                    torch.addmm(bias, x2, w_ih.t(), out=xp)
            else:
                xp.copy_(torch.nn.functional.linear(x2.to(mm_dtype), w_ih.to(mm_dtype),
                                                    None if bias is None else bias.to(mm_dtype)))
            xp_buf[R:].zero_()
            # the output, in the native 'cat' layout
            y = torch.empty(B, H, W, D * hidden, device=x.device, dtype=cdt)
            save = ctx.record and any(ctx.needs_input_grad)
            saved = _recurrence_torch(xp_buf, w_hh.transpose(1, 2), rows, inv, D, N, hidden, y.view(R, hidden), save)
            del xp_buf, xp
            if save:
                act, cs, sc = saved
                ctx.save_for_backward(x, w_ih, w_hh, rows, inv, prev, act, cs, sc, y)
                ctx.meta = (kinds, hidden, has_bias, padded, cdt,
                            [p.dtype if p is not None else None for p in params])
            if out_dtype != cdt:
                y = y.to(out_dtype)
        return y

    @staticmethod
    def backward(ctx, gy):
        if plain_backward(gy):   # create_graph (gradient penalties and the like) or batched gradients
            return _double_backward(ctx, gy)
        if ctx.kernel:
            return _backward_cpu_kernel(ctx, gy)
        if ctx.triton:
            return _backward_triton(ctx, gy)
        x, w_ih, w_hh, rows, inv, prev, act, cs, sc, y = ctx.saved_tensors
        kinds, hidden, has_bias, padded, cdt, dtypes = ctx.meta
        B, H, W, C = x.shape
        D = len(kinds)
        G = 4 * hidden
        T, DN = rows.shape
        N = DN // D
        R = B * H * W * D
        BHW = B * H * W
        with autocast_off(x.device.type):
            gy = gy.to(cdt).reshape(R, hidden)
            if padded:  # padded steps read a zero row
                gy = torch.cat([gy, gy.new_zeros(1, hidden)])
            dxp = torch.empty(BHW, D * G, device=x.device, dtype=cdt)
            _backward_torch(gy.contiguous(), act, cs, sc, w_hh, rows, inv, D, N, hidden, dxp.view(R, G))
            x2 = x.reshape(BHW, C).to(cdt)
            dx = torch.mm(dxp, w_ih).view(B, H, W, C).to(x.dtype) if ctx.needs_input_grad[0] else None
            dw_ih = torch.mm(dxp.t(), x2)                                                 # (D*4h, C)
            yz = torch.cat([y.view(R, hidden), y.new_zeros(1, hidden)])                    # + a zero row
            h_prev = yz.index_select(0, prev).view(BHW, D, hidden)                         # h_{t-1} by token
            dw_hh = torch.bmm(dxp.view(BHW, D, G).permute(1, 2, 0), h_prev.transpose(0, 1))  # (D, 4h, h)
            db = dxp.sum(0) if has_bias else None
            grads: List[Optional[torch.Tensor]] = [None] * (4 * D)
            for d in range(D):
                grads[4 * d] = _from_internal(dw_ih[d * G:(d + 1) * G], hidden).to(dtypes[4 * d])
                grads[4 * d + 1] = _from_internal(dw_hh[d], hidden).to(dtypes[4 * d + 1])
                if has_bias:
                    gb = _from_internal(db[d * G:(d + 1) * G], hidden)
                    grads[4 * d + 2] = gb.to(dtypes[4 * d + 2])
                    grads[4 * d + 3] = gb.to(dtypes[4 * d + 3])
        return (dx, None, None, None, None, None, *grads)


def _plain_rnn2d(x: torch.Tensor, kinds, hidden: int, params) -> torch.Tensor:
    """What ``_FusedLSTM2D`` computes, by nn.LSTM's own (differentiable) op, one direction at a time: vertical
    directions run along H, horizontal ones along W, reverse ones over the flipped sequence; the outputs in
    ``kinds`` order, (B, H, W, len(kinds) * hidden)."""
    B, H, W, C = x.shape
    outs = []
    for d, (vertical, reverse) in enumerate(kinds):
        w_ih, w_hh, b_ih, b_hh = (p if p is None else p.to(x.dtype) for p in params[4 * d:4 * d + 4])
        grid = x.transpose(1, 2) if vertical else x                     # sequences along the last-but-one axis
        seq = grid.reshape(-1, grid.shape[2], C)
        seq = seq.flip(1) if reverse else seq
        h0 = seq.new_zeros(1, seq.shape[0], hidden)
        flat = [w_ih, w_hh] + ([b_ih, b_hh] if b_ih is not None else [])
        out = torch.lstm(seq, (h0, h0), flat, b_ih is not None, 1, 0.0, False, False, True)[0]
        out = (out.flip(1) if reverse else out).reshape(*grid.shape[:3], hidden)
        outs.append(out.transpose(1, 2) if vertical else out)
    return torch.cat(outs, -1)


def _double_backward(ctx, gy):
    """The backward with ``create_graph`` or batched gradients (``plain_backward``): the gradients of a plain
    recomputation from the saved input and the parameters, themselves differentiable and batchable (the compiled
    and Triton kernels are not)."""
    kinds, hidden, params = ctx.plain
    needs = (ctx.needs_input_grad[0],) + ctx.needs_input_grad[6:]
    x, *params = recompute_leaves((ctx.saved_tensors[0],) + tuple(params), needs)
    wanted = [t for t, need in zip([x] + params, needs) if need and t is not None]
    create = torch.is_grad_enabled()
    with torch.enable_grad(), autocast_off(x.device.type):
        y = _plain_rnn2d(x, kinds, hidden, params)
        grads = iter(torch.autograd.grad(y, wanted, gy.to(y.dtype), create_graph=create) if wanted else ())
    dx = next(grads) if ctx.needs_input_grad[0] else None
    rest = [next(grads) if need and p is not None else None for p, need in zip(params, ctx.needs_input_grad[6:])]
    return (dx, None, None, None, None, None, *rest)


def _kind_codes(kinds) -> List[int]:
    return [2 * int(vertical) + int(reverse) for vertical, reverse in kinds]


# ---- per-thread scratch buffers of the CPU kernel path -----------------------------------------------------

WORKSPACE_LIMIT_BYTES = 1 << 30   # larger scratch requests are allocated afresh and not kept
_workspace = threading.local()


def _scratch(slot: str, rows: int, cols: int) -> torch.Tensor:
    """An uninitialised (rows, cols) float32 CPU tensor backed by a buffer kept for reuse by this thread.

    The input projections are large (25 MB per BiLSTM2D of Sequencer2D-S's first stage at batch 8) and,
    without gradients, live only during one forward call: fresh allocations of that size come from new
    pages, and the page faults cost as much as the GEMM that fills them. (When training, the projections
    become the saved gate activations, so they are allocated afresh.) Each slot is used by one call at a
    time (the forward's 'xp'), never by a returned tensor. ``release_workspace()`` frees this thread's
    buffers.
    """
    n = rows * cols
    if n * 4 > WORKSPACE_LIMIT_BYTES or torch.compiler.is_compiling():
        return torch.empty(rows, cols, dtype=torch.float32, device='cpu')   # (compiled graphs manage buffers)
    bufs = getattr(_workspace, 'bufs', None)
    if bufs is None:
        bufs = _workspace.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):   # a normal tensor: writable in and out of inference mode
            buf = bufs[slot] = torch.empty(n, dtype=torch.float32, device='cpu')
    return buf[:n].view(rows, cols)


def release_workspace() -> None:
    """Free the scratch buffers the CPU kernel path keeps for the calling thread."""
    _workspace.bufs = {}


def _stacked_weights(params, D: int, dtype: torch.dtype):
    """(W_ih (D*4h, C), W_hh (D, 4h, h), b_ih + b_hh (D*4h) or None) of all directions in ``dtype``, in
    nn.LSTM's layout (concatenated, not reordered; the bias summed in float32): copies, made on every call."""
    with torch.no_grad():
        w_ih = torch.cat([params[4 * d] for d in range(D)]).to(dtype)
        w_hh = torch.stack([params[4 * d + 1] for d in range(D)]).to(dtype)
    return w_ih, w_hh, _summed_bias(params, D, dtype)


def _summed_bias(params, D: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """b_ih + b_hh of all directions (D*4h), summed in float32, in ``dtype``; None without biases."""
    if params[2] is None:
        return None
    f32 = torch.float32
    with torch.no_grad():
        return (torch.cat([params[4 * d + 2] for d in range(D)]).to(f32)
                + torch.cat([params[4 * d + 3] for d in range(D)]).to(f32)).to(dtype)


# ---- the recurrences' parameters as views of stacked buffers (CPU inference reads them without copying) --------

class _Flat(NamedTuple):
    w_ih: torch.Tensor                  # (D*4h, C): direction d's W_ih is rows d*4h ... (d+1)*4h
    w_hh: torch.Tensor                  # (D, 4h, h)
    b_ih: Optional[torch.Tensor]        # (D*4h,)
    b_hh: Optional[torch.Tensor]        # (D*4h,)
    ptrs: Tuple[int, ...]               # where each parameter's data starts (0: no bias)


# the first direction's W_ih (a Parameter) -> its layer's buffers; keyed by identity, dropped with the parameter (a
# deep copy of the model has new parameters, not in here: it stacks on every call until flattened again)
_flat = WeakIdKeyDictionary()


def _ptrs(params) -> Tuple[int, ...]:
    return tuple(0 if p is None else p.data_ptr() for p in params)


def flat_weights(params) -> Optional[_Flat]:
    """The stacked buffers that ``params`` (``FastRNN2D._lstm_params()``'s) are views of right now, else None.

    Every parameter must still start where ``flatten_weights`` put it: a parameter replaced, assigned a new
    ``.data``, moved, cast, parametrized or swapped by ``functional_call`` starts elsewhere (the buffers are alive,
    so no other tensor starts inside them), and the layer then stacks copies as before. Values written in place,
    ``.data`` writes included, are the buffers' own: nothing can go stale."""
    if not params or params[0] is None or torch.compiler.is_compiling():
        return None
    flat = _flat.get(params[0])
    if flat is None or flat.ptrs != _ptrs(params):
        return None
    return flat


def flatten_weights(module: nn.Module) -> bool:
    """Make the LSTM parameters of ``module`` (an ``RNN2D`` of single-layer LSTMs) views of one stacked buffer per
    kind (W_ih, W_hh, b_ih, b_hh; directions in the fused engine's order), in place, as cuDNN's
    ``flatten_parameters`` does for ``nn.LSTM``: the fused CPU kernel's inference then reads the stacked weights
    where they are instead of copying them at every call (3% of a batch-1 inference of Sequencer2D-S on a 2-core
    Xeon). The same Parameter objects, values, state_dict keys and checkpoints; only where their data lives changes.

    CPU float32 parameters only, not in shared memory (``share_memory()`` is kept); elsewhere nothing changes (the
    buffers of an earlier flattening that the parameters left, as ``.half()`` leaves them, are let go) and False is
    returned. ``set_engine`` and ``FastRNN2D._apply`` (``.to()``, ``.float()``, ...) call it."""
    if getattr(module, 'rnn_layer', None) != 'lstm' or getattr(module, 'num_layers', 0) != 1:
        return False
    params = module._lstm_params()[1]
    if not params:
        return False
    if flat_weights(params) is not None:
        return True
    if params[0] is not None:
        _flat.pop(params[0], None)
    present = [p for p in params if p is not None]
    if (len(present) not in (len(params), len(params) // 2)
            or not all(isinstance(p, nn.Parameter) and p.device.type == 'cpu' and p.dtype == torch.float32
                       and p.is_contiguous() and not p.is_inference() and not p.is_shared() for p in present)):
        return False
    with torch.no_grad(), torch.inference_mode(False):
        bufs: List[Optional[torch.Tensor]] = []
        for k in range(4):   # w_ih, w_hh, b_ih, b_hh of every direction
            group = params[k::4]
            if group[0] is None:
                bufs.append(None)
                continue
            buf = torch.stack(group) if k == 1 else torch.cat(group)
            for p, view in zip(group, buf.unbind(0) if k == 1 else buf.split(group[0].shape[0])):
                p.data = view
            bufs.append(buf)
    _flat[params[0]] = _Flat(*bufs, _ptrs(params))
    return True


def _kernel_weights(params, D: int, inference: bool) -> Tuple[Optional[torch.Tensor], ...]:
    """(W_ih (D*4h, C), W_hh (D, 4h, h) or None, W_hh^T (D, h, 4h) contiguous, bias (D*4h)) in float32 for the CPU
    kernel. Training: copies, made at every call (the backward keeps W_ih and W_hh). Inference (no W_hh): with
    packed weights kept per layer (``gemm.kept``) and made again when a parameter is replaced or changed in place;
    else W_ih read from the flattened parameters where they are (``flatten_weights``), else stacked; W_hh^T is
    always one copy."""
    def make():
        w_ih, w_hh, bias = _stacked_weights(params, D, torch.float32)
        return (w_ih, w_hh, w_hh.transpose(1, 2).contiguous(),
                w_ih.new_zeros(w_ih.shape[0]) if bias is None else bias)

    if not inference:
        return make()

    def make_inference(flat=None):
        with torch.no_grad():
            if flat is not None:
                w_ih, w_hh_t = flat.w_ih, flat.w_hh.transpose(1, 2).contiguous()
                bias = None if flat.b_ih is None else flat.b_ih + flat.b_hh
            else:   # W_hh^T in one copy, no W_hh
                w_ih = torch.cat([params[4 * d] for d in range(D)]).float()
                w_hh_t = torch.stack([params[4 * d + 1].t() for d in range(D)]).float()
                bias = _summed_bias(params, D, torch.float32)
        return w_ih, None, w_hh_t, w_ih.new_zeros(w_ih.shape[0]) if bias is None else bias

    if gemm.packing() and params[0].device.type == 'cpu' and not any(
            p.is_inference() for p in params if p is not None):   # (no version counter to follow changes by)
        key = tuple((id(p), gemm.state(p)) for p in params if p is not None)
        return gemm.kept(params[0], key, make_inference)
    return make_inference(flat_weights(params))


def _forward_cpu_kernel(ctx, x, kinds, hidden, out_dtype, mm_dtype, params):
    """Forward through the compiled CPU recurrence (``cpu_kernel``): nn.LSTM's gate order, no plan gathers."""
    B, H, W, C = x.shape
    D = len(kinds)
    BHW = B * H * W
    f32 = torch.float32
    with torch.autocast('cpu', enabled=False):
        has_bias = params[2] is not None
        save = ctx.record and any(ctx.needs_input_grad)
        w_ih, w_hh, w_hh_t, bias = _kernel_weights(params, D, inference=not save)
        # the input projection multiplies by ``W_ih.t()`` (a view): as fast as a transposed copy, without it
        x2 = x.reshape(BHW, C)
        # the bias is added inside the kernel; when training, the kernel turns xp into the gate activations
        # in place, which the backward keeps (a fresh buffer), else xp is scratch
        xp = (torch.empty(BHW, w_ih.shape[0], dtype=f32, device=x.device) if save
              else _scratch('xp', BHW, w_ih.shape[0]))
        xin = None
        if mm_dtype == f32 and x2.dtype == f32:
            xp = gemm.mm_into(xp, x2, w_ih.t(), pack=not save)   # into xp with MKL, a fresh tensor with oneDNN
        else:   # under autocast: the products in its dtype (as a Linear layer's), which the kernel reads as they
            w_ih = w_ih.to(mm_dtype)   # are; the recurrence in float32
            xin = torch.mm(x2.to(mm_dtype), w_ih.t())
        y = torch.empty(B, H, W, D * hidden, device=x.device, dtype=f32)
        cs = torch.ops.sequencer_lstm2d.forward(
            xp, bias, w_hh_t, B, H, W, _kind_codes(kinds), hidden, y.view(BHW, D * hidden), save, xin)
        del xin
        if save:
            # the backward's input gradient multiplies by this concatenation of W_ih again: kept (0.6-2.4 MB
            # per layer) rather than rebuilt
            w_ih_saved = w_ih if ctx.needs_input_grad[0] else w_ih.new_empty(0)
            ctx.save_for_backward(x, w_hh, xp, cs, y, w_ih_saved)
            ctx.meta = (kinds, hidden, has_bias, mm_dtype, [p.dtype if p is not None else None for p in params])
        if out_dtype != f32:
            y = y.to(out_dtype)
    return y


def _backward_cpu_kernel(ctx, gy):
    x, w_hh, gates, cs, y, w_ih = ctx.saved_tensors
    kinds, hidden, has_bias, mm_dtype, dtypes = ctx.meta
    B, H, W, C = x.shape
    D = len(kinds)
    G = 4 * hidden
    BHW = B * H * W
    f32 = torch.float32
    with torch.autocast('cpu', enabled=False):
        gy = gy.to(f32).reshape(BHW, D * hidden).contiguous()
        low = mm_dtype != f32
        dw_hh = torch.empty_like(w_hh)                # (D, 4h, h), accumulated step by step inside the kernel
        db = gy.new_empty(D * G if has_bias else 0)    # the bias gradient, summed inside the kernel
        if low:
            # under autocast the input and weight gradients' GEMMs run in its dtype, as for a Linear layer (and
            # nn.LSTM, and the GPU path), float32 accumulation inside the GEMMs: the kernel writes the gate
            # gradients in that dtype, and the saved activations stay as they are
            dxp = torch.empty(gates.shape, dtype=mm_dtype, device=gates.device)
            torch.ops.sequencer_lstm2d.backward(gy, gates, cs, w_hh, y.view(BHW, D * hidden), B, H, W,
                                                _kind_codes(kinds), hidden, dw_hh, db, dxp)
            x2 = x.reshape(BHW, C).to(mm_dtype)
            dx = torch.mm(dxp, w_ih).view(B, H, W, C).to(x.dtype) if ctx.needs_input_grad[0] else None
            dw_ih = torch.mm(dxp.t(), x2).to(f32)
        else:
            # the kernel replaces the saved activations by the gate gradients (token order) in place; a graph
            # kept for another backward (retain_graph) needs them again, and gets a copy instead
            dxp = gates.clone() if _graph_kept() else gates
            torch.ops.sequencer_lstm2d.backward(gy, dxp, cs, w_hh, y.view(BHW, D * hidden), B, H, W,
                                                _kind_codes(kinds), hidden, dw_hh, db)
            x2 = x.reshape(BHW, C).to(f32)
            if ctx.needs_input_grad[0]:
                dx = gemm.mm(dxp, w_ih, 'input_grad').view(B, H, W, C).to(x.dtype)     # w_ih: (D*4h, C)
            else:
                dx = None
            dw_ih = gemm.mm(dxp.t(), x2, 'weight_grad')                                      # (D*4h, C)
    return (dx, None, None, None, None, None, *_param_grads(dw_ih, dw_hh, db if has_bias else None, D, dtypes))


# ---- the GPU path: Triton recurrences (triton_lstm), the rest as single GEMMs -------------------------------

def _forward_triton(ctx, x, kinds, hidden, out_dtype, mm_dtype, params):
    """Forward through the Triton recurrence. Under autocast (``mm_dtype`` float16 / bfloat16) the input
    projection, the recurrent products (tensor cores, float32 accumulation) and the output are in that dtype,
    as cuDNN's LSTM runs under autocast; the cell state and the gate arithmetic stay float32."""
    from . import triton_lstm  # optional dependency (triton)
    B, H, W, C = x.shape
    D = len(kinds)
    BHW = B * H * W
    f32 = torch.float32
    lowp = mm_dtype in (torch.float16, torch.bfloat16)
    pdt = mm_dtype if lowp else f32                  # the products' dtype
    with autocast_off(x.device.type):
        rows, _, prev, _ = _plan(B, H, W, kinds, x.device)
        N = rows.shape[1] // D
        has_bias = params[2] is not None
        w_ih, w_hh, bias = _stacked_weights(params, D, pdt)      # nn.LSTM's layout: no reordering
        x2 = x.reshape(BHW, C).to(pdt)
        if has_bias:
            xp = torch.addmm(bias, x2, w_ih.t())                 # (BHW, D*4h): row token*D + d of (R, 4h)
        else:
            xp = torch.mm(x2, w_ih.t())
        save = ctx.record and any(ctx.needs_input_grad)
        yz, act, cs = triton_lstm.forward(xp.view(BHW * D, 4 * hidden), w_hh, rows, D, N, hidden, save)
        y = yz[:BHW * D].view(B, H, W, D * hidden)               # the 'cat' layout, no permute
        if save:
            # x itself, not x2 (made here, without a graph: a double backward differentiates x); yz: y and a zero
            # row. Where x is in the products' dtype already (the pre-norm writes it so under autocast), x2 is a view
            ctx.save_for_backward(x, w_ih, w_hh, rows, prev, act, cs, yz)
            ctx.meta = (kinds, hidden, has_bias, x.shape, x.dtype, [p.dtype if p is not None else None for p in params])
        if out_dtype != y.dtype:
            y = y.to(out_dtype)
    return y


def _backward_triton(ctx, gy):
    from . import triton_lstm  # optional dependency (triton)
    x, w_ih, w_hh, rows, prev, act, cs, yz = ctx.saved_tensors
    kinds, hidden, has_bias, x_shape, x_dtype, dtypes = ctx.meta
    B, H, W, C = x_shape
    D = len(kinds)
    G = 4 * hidden
    BHW = B * H * W
    R = BHW * D
    N = rows.shape[1] // D
    with autocast_off(gy.device.type):
        gy = gy.reshape(R, hidden).contiguous()
        dxp = triton_lstm.backward(gy, act, cs, w_hh, rows, D, N, hidden).view(BHW, D * G)   # in w_hh's dtype
        dx = torch.mm(dxp, w_ih).view(B, H, W, C).to(x_dtype) if ctx.needs_input_grad[0] else None
        dw_ih = torch.mm(dxp.t(), x.reshape(BHW, C).to(w_ih.dtype)).float()                      # (D*4h, C)
        h_prev = yz.index_select(0, prev).view(BHW, D, hidden)   # h_{t-1} by token (row R: zeros)
        dw_hh = torch.bmm(dxp.view(BHW, D, G).permute(1, 2, 0), h_prev.transpose(0, 1)).float()   # (D, 4h, h)
        db = dxp.sum(0, dtype=torch.float32) if has_bias else None
    return (dx, None, None, None, None, None, *_param_grads(dw_ih, dw_hh, db, D, dtypes))


def _param_grads(dw_ih: torch.Tensor, dw_hh: torch.Tensor, db: Optional[torch.Tensor], D: int,
                 dtypes) -> List[Optional[torch.Tensor]]:
    """The per-direction (w_ih, w_hh, b_ih, b_hh) gradients from the stacked ones in nn.LSTM's layout
    (D*4h, C), (D, 4h, h) and (D*4h,): views, cast only where a parameter is not float32. ``b_ih`` and ``b_hh``
    have the same gradient; ``b_hh``'s are views of one copy, so that autograd keeps every view as the
    parameter's ``.grad`` (given the same tensor twice it copies the second, one small copy per direction)."""
    G = dw_hh.shape[1]
    parts = [dw_ih.split(G), dw_hh.unbind(0)]
    parts += [db.split(G), db.clone().split(G)] if db is not None else [(None,) * D] * 2
    grads: List[Optional[torch.Tensor]] = [p[d] for d in range(D) for p in parts]   # (w_ih, w_hh, b_ih, b_hh)
    for i, (g, dt) in enumerate(zip(grads, dtypes)):
        if g is not None and g.dtype != dt:
            grads[i] = g.to(dt)
    return grads


def _graph_kept() -> bool:
    """Whether this backward keeps the graph for another one (``retain_graph``), or may not be the only one
    (traced by torch.compile, or the flag cannot be read): then saved tensors must stay intact."""
    if torch.compiler.is_compiling():
        return True
    keep = getattr(torch._C._autograd, '_get_current_graph_task_keep_graph', None)
    try:
        return True if keep is None else bool(keep())
    except RuntimeError:   # not inside a backward run by the engine
        return True


def _use_triton(x: torch.Tensor, cdt: torch.dtype, hidden: int, mm_dtype: torch.dtype) -> bool:
    """Whether the Triton kernels run the recurrence: on the GPU path where Triton is available, not in float64,
    and for hidden sizes whose tiles fit the GPU (``triton_lstm.supported``; others run the torch code)."""
    if cdt != torch.float32 or not gpu_path(x):
        return False
    if triton_on_cpu_active():
        return True
    if not triton_ok():
        return False
    from . import triton_lstm  # optional dependency (triton)
    return triton_lstm.supported(hidden, mm_dtype in (torch.float16, torch.bfloat16))


def fused_rnn2d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The united output of ``module`` (an ``RNN2D`` of single-layer LSTMs) for NHWC ``x``, before ``fc``."""
    kinds, params = module._lstm_params()
    amp = autocast_dtype(x.device.type)
    if amp is not None:
        out_dtype = mm_dtype = amp
    else:
        out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32
        mm_dtype = torch.float32
    if x.dtype == torch.float64:  # double precision throughout (gradient checks)
        mm_dtype = torch.float64
    y = apply(_FusedLSTM2D, x, kinds, module.hidden_size, out_dtype, mm_dtype, torch.is_grad_enabled(), *params)
    if module.union == 'add':
        B, H, W, _ = x.shape
        y = y.view(B, H, W, 2, -1).sum(3)
    return y
