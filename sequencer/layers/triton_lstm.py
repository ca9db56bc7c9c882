"""Triton kernels for the recurrence of the fused BiLSTM2D engine (GPU): forward and backward (BPTT).

Forward: one program advances ``BLOCK_N`` sequences of one direction through all time steps. It loads the four
(h x h) gate blocks of that direction's ``W_hh`` once and keeps them on chip (registers / shared memory)
for the whole sequence; per step it gathers the precomputed input gates of its sequences (through the
same ``rows`` index table as the torch path, so the reversed directions and the padding of non-square
grids are index arithmetic), computes ``h @ W_hh`` with ``tl.dot``, applies the LSTM cell in registers
and writes ``h`` straight into the output rows. With ``SAVE`` it also stores the gate activations and
cell states that the torch backward of ``fused_lstm`` reads, in exactly the torch path's layout.

The layouts and the internal gate convention (order i, f, o, g with the g rows scaled by -2, so that
``g = 1 - 2 sigmoid(.)``) are those of ``fused_lstm``. The kernel computes in float32 (``tl.dot`` in
IEEE float32 for float32 weights, so it matches ``nn.LSTM`` like the torch path does).

Backward: one program runs the (dh, dc) recursion of ``BLOCK_N`` sequences of one direction from the last
step to the first, again with that direction's ``W_hh`` on chip: per step it reads the output gradient of
its tokens, the saved gates and cell states, computes the gate gradients in registers, writes them
straight into their token rows (so the input and weight gradients are single GEMMs outside, as in the
torch backward) and multiplies them by ``W_hh`` with ``tl.dot`` for the step before. Only ``dh`` and
``dc`` are carried between steps.

CPU tensors run through Triton's interpreter (the same kernel source, executed in numpy): slow, but it
lets the kernel be tested without a GPU.
"""
from typing import Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
    constexpr = tl.constexpr
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None
    constexpr = int


def available() -> bool:
    """Whether Triton can run the kernel on CUDA tensors here."""
    return triton is not None and torch.cuda.is_available()


def _lstm_fwd_kernel(xp_ptr, whh_ptr, rows_ptr, y_ptr, act_ptr, cs_ptr, sc_ptr,
                     T, N, D,
                     HID: constexpr, BLOCK_N: constexpr, BLOCK_H: constexpr, SAVE: constexpr):
    d = tl.program_id(0)
    nb = tl.program_id(1)
    G = 4 * HID
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    mask_n = offs_n < N
    mask_h = offs_h < HID
    mask = mask_n[:, None] & mask_h[None, :]
    mask_w = mask_h[:, None] & mask_h[None, :]
    # W_hh of this direction, (4h, h) internal layout, loaded transposed per gate: w_q[k, j] = W[q*h + j, k]
    w_base = whh_ptr + d * G * HID + offs_h[None, :] * HID + offs_h[:, None]
    w_i = tl.load(w_base + 0 * HID * HID, mask=mask_w, other=0.0)
    w_f = tl.load(w_base + 1 * HID * HID, mask=mask_w, other=0.0)
    w_o = tl.load(w_base + 2 * HID * HID, mask=mask_w, other=0.0)
    w_g = tl.load(w_base + 3 * HID * HID, mask=mask_w, other=0.0)
    h = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    c = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for t in range(T):
        r = tl.load(rows_ptr + t * D * N + d * N + offs_n, mask=mask_n, other=0)
        x_base = xp_ptr + r[:, None] * G + offs_h[None, :]
        a_i = tl.load(x_base, mask=mask, other=0.0) + tl.dot(h, w_i, input_precision="ieee")
        a_f = tl.load(x_base + HID, mask=mask, other=0.0) + tl.dot(h, w_f, input_precision="ieee")
        a_o = tl.load(x_base + 2 * HID, mask=mask, other=0.0) + tl.dot(h, w_o, input_precision="ieee")
        a_g = tl.load(x_base + 3 * HID, mask=mask, other=0.0) + tl.dot(h, w_g, input_precision="ieee")
        i = 1.0 / (1.0 + tl.exp(-a_i))
        f = 1.0 / (1.0 + tl.exp(-a_f))
        o = 1.0 / (1.0 + tl.exp(-a_o))
        s = 1.0 / (1.0 + tl.exp(-a_g))          # g = tanh(a) = 1 - 2 s (g rows scaled by -2)
        c = f * c + i * (1.0 - 2.0 * s)
        sc = 1.0 / (1.0 + tl.exp(2.0 * c))      # tanh(c) = 1 - 2 sigmoid(-2c)
        h = o * (1.0 - 2.0 * sc)
        h = tl.where(mask, h, 0.0)
        tl.store(y_ptr + r[:, None] * HID + offs_h[None, :], h, mask=mask)
        if SAVE:
            step = (t * D + d) * N + offs_n
            a_base = act_ptr + step[:, None] * G + offs_h[None, :]
            tl.store(a_base, i, mask=mask)
            tl.store(a_base + HID, f, mask=mask)
            tl.store(a_base + 2 * HID, o, mask=mask)
            tl.store(a_base + 3 * HID, s, mask=mask)
            c_off = step[:, None] * HID + offs_h[None, :]
            tl.store(cs_ptr + c_off, c, mask=mask)
            tl.store(sc_ptr + c_off, sc, mask=mask)


def _lstm_bwd_kernel(gy_ptr, whh_ptr, rows_ptr, act_ptr, cs_ptr, sc_ptr, dxp_ptr,
                     T, N, D,
                     HID: constexpr, BLOCK_N: constexpr, BLOCK_H: constexpr):
    d = tl.program_id(0)
    nb = tl.program_id(1)
    G = 4 * HID
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    mask_n = offs_n < N
    mask_h = offs_h < HID
    mask = mask_n[:, None] & mask_h[None, :]
    mask_w = mask_h[:, None] & mask_h[None, :]
    # W_hh of this direction per gate, not transposed: w_q[j, k] = W[q*h + j, k], so dG_q @ w_q is dh's share
    w_base = whh_ptr + d * G * HID + offs_h[:, None] * HID + offs_h[None, :]
    w_i = tl.load(w_base + 0 * HID * HID, mask=mask_w, other=0.0)
    w_f = tl.load(w_base + 1 * HID * HID, mask=mask_w, other=0.0)
    w_o = tl.load(w_base + 2 * HID * HID, mask=mask_w, other=0.0)
    w_g = tl.load(w_base + 3 * HID * HID, mask=mask_w, other=0.0)
    dh_rec = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)   # dG_{t+1} @ W_hh
    dc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)       # dc carried from step t + 1
    for tt in range(T):
        t = T - 1 - tt
        r = tl.load(rows_ptr + t * D * N + d * N + offs_n, mask=mask_n, other=0)
        dh = tl.load(gy_ptr + r[:, None] * HID + offs_h[None, :], mask=mask, other=0.0) + dh_rec
        step = (t * D + d) * N + offs_n
        a_base = act_ptr + step[:, None] * G + offs_h[None, :]
        i = tl.load(a_base, mask=mask, other=0.0)
        f = tl.load(a_base + HID, mask=mask, other=0.0)
        o = tl.load(a_base + 2 * HID, mask=mask, other=0.0)
        s = tl.load(a_base + 3 * HID, mask=mask, other=0.0)
        c_off = step[:, None] * HID + offs_h[None, :]
        sc = tl.load(sc_ptr + c_off, mask=mask, other=0.0)
        c_prev = tl.load(cs_ptr + c_off - D * N * HID, mask=mask & (t > 0), other=0.0)
        # dc += dh o (1 - tanh(c)^2), with tanh(c) = 1 - 2 sc and 1 - tanh(c)^2 = 4 sc (1 - sc)
        dc = dc + 4.0 * dh * o * (sc - sc * sc)
        m2dc = -2.0 * dc
        di = dc + m2dc * s                       # dc g, g = 1 - 2 s
        df = dc * c_prev
        do = dh - 2.0 * dh * sc                  # dh tanh(c)
        ds = m2dc * i
        dg_i = di * i * (1.0 - i)                # through the sigmoids
        dg_f = df * f * (1.0 - f)
        dg_o = do * o * (1.0 - o)
        dg_s = ds * s * (1.0 - s)
        x_base = dxp_ptr + r[:, None] * G + offs_h[None, :]
        tl.store(x_base, dg_i, mask=mask)
        tl.store(x_base + HID, dg_f, mask=mask)
        tl.store(x_base + 2 * HID, dg_o, mask=mask)
        tl.store(x_base + 3 * HID, dg_s, mask=mask)
        dc = dc * f
        dh_rec = (tl.dot(dg_i, w_i, input_precision="ieee") + tl.dot(dg_f, w_f, input_precision="ieee")
                  + tl.dot(dg_o, w_o, input_precision="ieee") + tl.dot(dg_s, w_g, input_precision="ieee"))


_KERNELS = {}


def _kernel(fn, interpret: bool):
    """``fn`` compiled for the GPU, or wrapped for Triton's interpreter (CPU tensors)."""
    key = (fn.__name__, interpret)
    if key not in _KERNELS:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction
            _KERNELS[key] = InterpretedFunction(fn)
        else:
            from triton.runtime.jit import JITFunction
            _KERNELS[key] = JITFunction(fn)
    return _KERNELS[key]


def _blocks(hidden: int, block_n: Optional[int]) -> Tuple[int, int]:
    block_h = max(16, triton.next_power_of_2(hidden))
    if block_n is None:
        block_n = 16 if block_h >= 128 else 32
    return block_n, block_h


def lstm_recurrence_triton(xp_rows: torch.Tensor, w_hh: torch.Tensor, rows: torch.Tensor, D: int, N: int,
                           hidden: int, out_rows: torch.Tensor, save: bool,
                           block_n: Optional[int] = None) -> Optional[Tuple[torch.Tensor, ...]]:
    """Drop-in for ``fused_lstm._recurrence_torch`` (same arguments, except ``w_hh`` is (D, 4h, h)).

    xp_rows (R+1, 4h) float32 input gates by token row; rows (T, D*N) index table; out_rows (R+1, h)
    receives h. With ``save`` returns (act (T, D, N, 4h), cs (T, D, N, h), sc (T, D, N, h)).
    """
    if triton is None:
        raise RuntimeError("the Triton LSTM kernel needs the 'triton' package")
    T = rows.shape[0]
    G = 4 * hidden
    dev = xp_rows.device
    xp_rows = xp_rows.float().contiguous()
    w_hh = w_hh.float().contiguous()
    rows = rows.contiguous()
    if save:
        act = torch.empty(T, D, N, G, device=dev, dtype=torch.float32)
        cs = torch.empty(T, D, N, hidden, device=dev, dtype=torch.float32)
        sc = torch.empty(T, D, N, hidden, device=dev, dtype=torch.float32)
    else:
        act = cs = sc = out_rows  # unused pointers
    block_n, block_h = _blocks(hidden, block_n)
    grid = (D, triton.cdiv(N, block_n))
    _kernel(_lstm_fwd_kernel, dev.type != 'cuda')[grid](xp_rows, w_hh, rows, out_rows, act, cs, sc, T, N, D,
                                       HID=hidden, BLOCK_N=block_n, BLOCK_H=block_h, SAVE=save)
    return (act, cs, sc) if save else None


def lstm_backward_triton(gy_rows: torch.Tensor, act: torch.Tensor, cs: torch.Tensor, sc: torch.Tensor,
                         w_hh: torch.Tensor, rows: torch.Tensor, D: int, N: int, hidden: int,
                         dxp_rows: torch.Tensor, block_n: Optional[int] = None) -> None:
    """The backward recursion, in place of ``fused_lstm._backward_torch``.

    gy_rows (R+1, h) float32 output gradient by token row, its last row zero (read by padded steps);
    act / cs / sc: what the forward saved; w_hh (D, 4h, h) internal recurrent weights; rows (T, D*N).
    dxp_rows (R+1, 4h) float32 contiguous receives the internal gate gradients by token row (its last row
    is scratch, written by padded steps).
    """
    if triton is None:
        raise RuntimeError("the Triton LSTM kernel needs the 'triton' package")
    T = rows.shape[0]
    R = gy_rows.shape[0] - 1
    if dxp_rows.shape != (R + 1, 4 * hidden) or not dxp_rows.is_contiguous() or dxp_rows.dtype != torch.float32:
        raise ValueError('dxp_rows must be a contiguous float32 tensor of shape (R + 1, 4h)')
    block_n, block_h = _blocks(hidden, block_n)
    grid = (D, triton.cdiv(N, block_n))
    _kernel(_lstm_bwd_kernel, gy_rows.device.type != 'cuda')[grid](
        gy_rows.float().contiguous(), w_hh.float().contiguous(), rows.contiguous(), act, cs, sc, dxp_rows,
        T, N, D, HID=hidden, BLOCK_N=block_n, BLOCK_H=block_h)
