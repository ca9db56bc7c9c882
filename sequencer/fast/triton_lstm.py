"""Triton kernels for the recurrence of the fused BiLSTM2D engine (GPU): forward and backward (BPTT).

Forward: one program advances ``BLOCK_N`` sequences of one direction through all time steps. It keeps that
direction's four (h x h) gate blocks of ``W_hh`` on chip for the whole sequence (or, with ``RELOAD``,
reads them from the cache at each step); per step it gathers the precomputed input gates of its sequences
(through the ``rows`` index table of ``fused_lstm``, so the reversed directions and the padding of
non-square grids are index arithmetic: padded entries point to row R and are masked), computes
``h @ W_hh`` with ``tl.dot``, applies the LSTM cell in registers and writes ``h`` straight into the output
rows. With ``SAVE`` it also stores the gate activations (i, f, o, s with ``g = 1 - 2 s``) and the cell
states for the backward (which recomputes ``sigmoid(-2c)`` from c), in float32, or under autocast in
float16.

Layout: the input gates, ``W_hh`` and the gate gradients are in ``nn.LSTM``'s own layout and gate order
(i, f, g, o), so the parameters are only concatenated, never reordered. Products: float32 weights give
IEEE float32 ``tl.dot`` (the results match ``nn.LSTM`` to float32 rounding); float16 / bfloat16 weights
(autocast) give tensor-core products accumulated in float32, with ``h`` rounded to that dtype for the
product only: the cell state and the gate arithmetic stay float32.

Backward: one program runs the (dh, dc) recursion of ``BLOCK_N`` sequences of one direction from the last
step to the first, again with that direction's ``W_hh`` on chip: per step it reads the output gradient of
its tokens, the saved gates and cell states, computes the gate gradients in registers, writes them
straight into their token rows (so the input and weight gradients are single GEMMs outside) and
multiplies them by ``W_hh`` with ``tl.dot`` for the step before. Only ``dh`` and ``dc`` are carried
between steps.

On CUDA the launch configuration (``BLOCK_N``, warps, ``RELOAD``) is chosen per shape by timing the
``CANDIDATES`` on first use (triton.autotune). Both kernels are also torch ops
(``sequencer_triton::lstm2d_forward`` / ``lstm2d_backward``) with shape-only implementations, so
torch.compile keeps them in its graphs. CPU tensors run through Triton's interpreter (the same kernel
source, executed in numpy, with low-precision products emulated in float32): slow, but it lets the
kernels be tested without a GPU.
"""
import contextlib
import warnings
from typing import Dict, NamedTuple, Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
    constexpr = tl.constexpr
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None
    constexpr = int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def available() -> bool:
    """Whether Triton can run the kernel on CUDA tensors here."""
    return triton is not None and torch.cuda.is_available()


def _lstm_fwd_kernel(xp_ptr, whh_ptr, rows_ptr, y_ptr, act_ptr, cs_ptr,
                     T, N, D, R,
                     HID: constexpr, BLOCK_N: constexpr, BLOCK_H: constexpr, SAVE: constexpr,
                     LOWP: constexpr, RELOAD: constexpr, UPCAST: constexpr):
    d = tl.program_id(0)
    nb = tl.program_id(1)
    G = 4 * HID
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    mask_n = offs_n < N
    mask_h = offs_h < HID
    mask = mask_n[:, None] & mask_h[None, :]
    mask_w = mask_h[:, None] & mask_h[None, :]
    # W_hh of this direction, (4h, h) internal layout, read transposed per gate: w_q[k, j] = W[q*h + j, k]
    w_base = whh_ptr + d * G * HID + offs_h[None, :] * HID + offs_h[:, None]
    if not RELOAD:   # kept on chip for the whole sequence
        w_i0 = tl.load(w_base + 0 * HID * HID, mask=mask_w, other=0.0)
        w_f0 = tl.load(w_base + 1 * HID * HID, mask=mask_w, other=0.0)
        w_o0 = tl.load(w_base + 3 * HID * HID, mask=mask_w, other=0.0)
        w_g0 = tl.load(w_base + 2 * HID * HID, mask=mask_w, other=0.0)
    h = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    c = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for t in range(T):
        if RELOAD:   # read from the cache at every step (frees registers for larger tiles)
            w_i = tl.load(w_base + 0 * HID * HID, mask=mask_w, other=0.0)
            w_f = tl.load(w_base + 1 * HID * HID, mask=mask_w, other=0.0)
            w_o = tl.load(w_base + 3 * HID * HID, mask=mask_w, other=0.0)
            w_g = tl.load(w_base + 2 * HID * HID, mask=mask_w, other=0.0)
        else:
            w_i = w_i0
            w_f = w_f0
            w_o = w_o0
            w_g = w_g0
        r = tl.load(rows_ptr + t * D * N + d * N + offs_n, mask=mask_n, other=R)
        mask_r = mask & (r < R)[:, None]          # padded steps and sequences (row R) read zeros, write nothing
        x_base = xp_ptr + r[:, None] * G + offs_h[None, :]
        if LOWP:     # tensor-core products in the weights' (autocast) dtype, accumulated in float32
            hq = h.to(whh_ptr.dtype.element_ty)
            if UPCAST:   # the interpreter's low-precision dot is unreliable: the same products in float32
                hq = hq.to(tl.float32)
                w_i = w_i.to(tl.float32)
                w_f = w_f.to(tl.float32)
                w_o = w_o.to(tl.float32)
                w_g = w_g.to(tl.float32)
            a_i = tl.load(x_base, mask=mask_r, other=0.0).to(tl.float32) + tl.dot(hq, w_i)
            a_f = tl.load(x_base + HID, mask=mask_r, other=0.0).to(tl.float32) + tl.dot(hq, w_f)
            a_o = tl.load(x_base + 3 * HID, mask=mask_r, other=0.0).to(tl.float32) + tl.dot(hq, w_o)
            a_g = tl.load(x_base + 2 * HID, mask=mask_r, other=0.0).to(tl.float32) + tl.dot(hq, w_g)
        else:
            a_i = tl.load(x_base, mask=mask_r, other=0.0).to(tl.float32) + tl.dot(h, w_i, input_precision="ieee")
            a_f = (tl.load(x_base + HID, mask=mask_r, other=0.0).to(tl.float32)
                   + tl.dot(h, w_f, input_precision="ieee"))
            a_o = (tl.load(x_base + 3 * HID, mask=mask_r, other=0.0).to(tl.float32)
                   + tl.dot(h, w_o, input_precision="ieee"))
            a_g = (tl.load(x_base + 2 * HID, mask=mask_r, other=0.0).to(tl.float32)
                   + tl.dot(h, w_g, input_precision="ieee"))
        i = 1.0 / (1.0 + tl.exp(-a_i))
        f = 1.0 / (1.0 + tl.exp(-a_f))
        o = 1.0 / (1.0 + tl.exp(-a_o))
        s = 1.0 / (1.0 + tl.exp(2.0 * a_g))     # g = tanh(a) = 1 - 2 s, s = sigmoid(-2a)
        c = f * c + i * (1.0 - 2.0 * s)
        sc = 1.0 / (1.0 + tl.exp(2.0 * c))      # tanh(c) = 1 - 2 sigmoid(-2c)
        h = o * (1.0 - 2.0 * sc)
        h = tl.where(mask, h, 0.0)
        tl.store(y_ptr + r[:, None] * HID + offs_h[None, :], h, mask=mask_r)
        if SAVE:
            step = ((t * D + d) * N + offs_n).to(tl.int64)   # offsets past 2^31 at large batches
            a_base = act_ptr + step[:, None] * G + offs_h[None, :]
            tl.store(a_base, i, mask=mask)
            tl.store(a_base + HID, f, mask=mask)
            tl.store(a_base + 2 * HID, o, mask=mask)
            tl.store(a_base + 3 * HID, s, mask=mask)
            tl.store(cs_ptr + step[:, None] * HID + offs_h[None, :], c, mask=mask)


def _lstm_bwd_kernel(gy_ptr, whh_ptr, rows_ptr, act_ptr, cs_ptr, dxp_ptr,
                     T, N, D, R,
                     HID: constexpr, BLOCK_N: constexpr, BLOCK_H: constexpr, LOWP: constexpr,
                     RELOAD: constexpr, UPCAST: constexpr):
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
    if not RELOAD:
        w_i0 = tl.load(w_base + 0 * HID * HID, mask=mask_w, other=0.0)
        w_f0 = tl.load(w_base + 1 * HID * HID, mask=mask_w, other=0.0)
        w_o0 = tl.load(w_base + 3 * HID * HID, mask=mask_w, other=0.0)
        w_g0 = tl.load(w_base + 2 * HID * HID, mask=mask_w, other=0.0)
    dh_rec = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)   # dG_{t+1} @ W_hh
    dc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)       # dc carried from step t + 1
    for tt in range(T):
        t = T - 1 - tt
        r = tl.load(rows_ptr + t * D * N + d * N + offs_n, mask=mask_n, other=R)
        mask_r = mask & (r < R)[:, None]
        dh = tl.load(gy_ptr + r[:, None] * HID + offs_h[None, :], mask=mask_r, other=0.0).to(tl.float32) + dh_rec
        step = ((t * D + d) * N + offs_n).to(tl.int64)
        a_base = act_ptr + step[:, None] * G + offs_h[None, :]
        i = tl.load(a_base, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(a_base + HID, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(a_base + 2 * HID, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(a_base + 3 * HID, mask=mask, other=0.0).to(tl.float32)
        c_off = step[:, None] * HID + offs_h[None, :]
        c = tl.load(cs_ptr + c_off, mask=mask, other=0.0).to(tl.float32)
        sc = 1.0 / (1.0 + tl.exp(2.0 * c))       # recomputed: sigmoid(-2c), tanh(c) = 1 - 2 sc
        c_prev = tl.load(cs_ptr + c_off - D * N * HID, mask=mask & (t > 0), other=0.0).to(tl.float32)
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
        dg_s = -2.0 * ds * s * (1.0 - s)         # d sigmoid(-2a) / da = -2 s (1 - s)
        x_base = dxp_ptr + r[:, None] * G + offs_h[None, :]   # nn.LSTM's gate order (i, f, g, o)
        tl.store(x_base, dg_i, mask=mask_r)
        tl.store(x_base + HID, dg_f, mask=mask_r)
        tl.store(x_base + 2 * HID, dg_s, mask=mask_r)
        tl.store(x_base + 3 * HID, dg_o, mask=mask_r)
        dc = dc * f
        if RELOAD:
            w_i = tl.load(w_base + 0 * HID * HID, mask=mask_w, other=0.0)
            w_f = tl.load(w_base + 1 * HID * HID, mask=mask_w, other=0.0)
            w_o = tl.load(w_base + 3 * HID * HID, mask=mask_w, other=0.0)
            w_g = tl.load(w_base + 2 * HID * HID, mask=mask_w, other=0.0)
        else:
            w_i = w_i0
            w_f = w_f0
            w_o = w_o0
            w_g = w_g0
        if LOWP:
            q = whh_ptr.dtype.element_ty
            if UPCAST:
                dg_i = dg_i.to(q).to(tl.float32)
                dg_f = dg_f.to(q).to(tl.float32)
                dg_o = dg_o.to(q).to(tl.float32)
                dg_s = dg_s.to(q).to(tl.float32)
                q = tl.float32
                w_i = w_i.to(tl.float32)
                w_f = w_f.to(tl.float32)
                w_o = w_o.to(tl.float32)
                w_g = w_g.to(tl.float32)
            dh_rec = (tl.dot(dg_i.to(q), w_i) + tl.dot(dg_f.to(q), w_f)
                      + tl.dot(dg_o.to(q), w_o) + tl.dot(dg_s.to(q), w_g))
        else:
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


class Config(NamedTuple):
    """How the kernels split the work: sequences per program, warps per program, and whether ``W_hh`` is
    held in registers for the whole sequence (False) or read from the cache at every step (True)."""
    block_n: int = 32
    num_warps: int = 4
    reload: bool = False


# the candidates the GPU launch chooses from, by timing each on its first call per shape (triton.autotune);
# float32 products (no tensor cores) keep to the smaller tiles. (128 sequences per program exceeded an
# H200's shared memory at both of Sequencer2D-S's hidden sizes; at hidden 96 so do most tiles above 16.)
CANDIDATES = (Config(16, 4, False), Config(32, 4, False), Config(64, 8, False), Config(16, 4, True),
              Config(32, 4, True), Config(64, 4, True), Config(64, 8, True),
              # 8 warps on the smaller tiles: compiled for sm_90 (benchmarks/triton_compile.py), these keep
              # hidden 96 in registers (16 sequences: no spill; 32: at most 40 B) where 4 warps spill up to 1 KB
              Config(16, 8, False), Config(16, 8, True), Config(32, 8, False), Config(32, 8, True))


_TUNING = [True]   # cleared if the autotuner fails to run


def _prune(configs, named_args, **kwargs):
    if kwargs.get('LOWP', named_args.get('LOWP')):
        return configs
    small = [c for c in configs if c.kwargs['BLOCK_N'] <= 32]
    return small or configs[:1]


def _tuned(fn, key_args):
    """``fn`` compiled for the GPU, its launch configuration chosen among ``CANDIDATES`` per shape."""
    key = (fn.__name__, 'tuned')
    if key not in _KERNELS:
        from triton.runtime.jit import JITFunction
        configs = [triton.Config({'BLOCK_N': c.block_n, 'RELOAD': c.reload}, num_warps=c.num_warps)
                   for c in CANDIDATES]
        _KERNELS[key] = triton.autotune(configs=configs, key=list(key_args),
                                        prune_configs_by={'early_config_prune': _prune})(JITFunction(fn))
    return _KERNELS[key]


def best_configs() -> Dict[str, dict]:
    """What the autotuned GPU kernels chose so far, by kernel and key (for benchmark reports)."""
    out = {}
    for (name, kind), k in _KERNELS.items():
        if kind == 'tuned':
            out[name] = {str(key): {**cfg.kwargs, 'num_warps': cfg.num_warps} for key, cfg in k.cache.items()}
    return out


def config_for(hidden: int) -> Tuple[Config, int]:
    """The default launch configuration (interpreter) and the padded (power-of-two) hidden size."""
    block_h = max(16, _next_pow2(hidden))
    return Config(block_n=16, num_warps=4, reload=block_h >= 128), block_h


def _on(device: torch.device):
    """Launch on ``device`` (Triton launches on the current CUDA device; switched only when it differs)."""
    if device.type != 'cuda' or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def supported(hidden: int, lowp: bool) -> bool:
    """Whether the kernels fit the GPU for this hidden size: its power-of-two padding up to 128 with
    low-precision products (the H200 ran hidden 48 and 96; at 128 only the smallest tiles fit its shared
    memory), up to 64 with float32 products (twice the bytes per tile). Other sizes run the torch code."""
    return max(16, 1 << (hidden - 1).bit_length()) <= (128 if lowp else 64)


def _saved_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the activations the forward saves: float32 for float32 products, else float16 (see
    ``lstm_recurrence_triton``)."""
    return torch.float32 if weight_dtype == torch.float32 else torch.float16


def _check(R: int, rows: torch.Tensor, *by_row: torch.Tensor) -> None:
    for t in by_row:
        if t.shape[0] < R or not t.is_contiguous():
            raise ValueError('the row tensors of the Triton LSTM kernels must be contiguous with at least R rows')
    if rows.dtype != torch.int64 or not rows.is_contiguous():
        raise ValueError('rows must be a contiguous int64 tensor')


def lstm_recurrence_triton(xp_rows: torch.Tensor, w_hh: torch.Tensor, rows: torch.Tensor, D: int, N: int,
                           hidden: int, out_rows: torch.Tensor, save: bool, R: Optional[int] = None,
                           config: Optional[Config] = None) -> Optional[Tuple[torch.Tensor, ...]]:
    """The forward recurrence of all D directions.

    xp_rows (>= R, 4h) input gates by token row (float32, or the autocast dtype); w_hh (D, 4h, h) internal
    recurrent weights: float32 for float32 products, float16 / bfloat16 for tensor-core products accumulated
    in float32; rows (T, D*N) index table, whose entries equal to R (default ``xp_rows.shape[0] - 1``) are
    padding: they read zeros and write nothing. out_rows (>= R, h) receives h in its own dtype. With
    ``save`` returns what the backward reads: act (T, D, N, 4h) the gate activations (i, f, o, s) and cs
    (T, D, N, h) the cell states, in float32, or in float16 for low-precision products (10 bytes per hidden
    unit and step instead of 24): the activations lie in (0, 1) and |c| <= T, where float16 keeps 8 times
    bfloat16's precision (near 1, where ``s (1 - s)`` needs it).
    """
    if triton is None:
        raise RuntimeError("the Triton LSTM kernel needs the 'triton' package")
    R = xp_rows.shape[0] - 1 if R is None else R
    _check(R, rows, xp_rows, out_rows)
    T = rows.shape[0]
    G = 4 * hidden
    dev = xp_rows.device
    w_hh = w_hh.contiguous()
    lowp = w_hh.dtype != torch.float32
    if save:
        keep = _saved_dtype(w_hh.dtype)
        act = torch.empty(T, D, N, G, device=dev, dtype=keep)
        cs = torch.empty(T, D, N, hidden, device=dev, dtype=keep)
    else:
        act = cs = out_rows  # unused pointers
    interpret = dev.type != 'cuda'
    default, block_h = config_for(hidden)
    args = (xp_rows, w_hh, rows, out_rows, act, cs, T, N, D, R)
    with _on(dev):
        _launch(_lstm_fwd_kernel, ('T', 'N', 'D', 'HID', 'LOWP', 'SAVE'), args, D, N, interpret, config, default,
                HID=hidden, BLOCK_H=block_h, SAVE=save, LOWP=lowp)
    return (act, cs) if save else None


def lstm_backward_triton(gy_rows: torch.Tensor, act: torch.Tensor, cs: torch.Tensor,
                         w_hh: torch.Tensor, rows: torch.Tensor, D: int, N: int, hidden: int,
                         dxp_rows: torch.Tensor, R: Optional[int] = None, config: Optional[Config] = None) -> None:
    """The backward recursion of all D directions.

    gy_rows (>= R, h) output gradient by token row (any float dtype); act / cs: what the forward
    saved; w_hh (D, 4h, h) internal recurrent weights, in the dtype of the forward's products; rows (T, D*N)
    with padding entries equal to R (default ``gy_rows.shape[0] - 1``). dxp_rows (>= R, 4h) receives the
    internal gate gradients by token row, in its own dtype.
    """
    if triton is None:
        raise RuntimeError("the Triton LSTM kernel needs the 'triton' package")
    R = gy_rows.shape[0] - 1 if R is None else R
    _check(R, rows, gy_rows, dxp_rows)
    if dxp_rows.shape[1] != 4 * hidden:
        raise ValueError('dxp_rows must have 4h columns')
    T = rows.shape[0]
    w_hh = w_hh.contiguous()
    lowp = w_hh.dtype != torch.float32
    interpret = gy_rows.device.type != 'cuda'
    default, block_h = config_for(hidden)
    args = (gy_rows, w_hh, rows, act, cs, dxp_rows, T, N, D, R)
    with _on(gy_rows.device):
        _launch(_lstm_bwd_kernel, ('T', 'N', 'D', 'HID', 'LOWP'), args, D, N, interpret, config, default,
                HID=hidden, BLOCK_H=block_h, LOWP=lowp)


def _launch(fn, key_args, args, D: int, N: int, interpret: bool, config: Optional[Config], default: Config,
            **consts) -> None:
    """Launch ``fn`` over (D, N / BLOCK_N) programs: autotuned on CUDA, else with ``config`` or ``default``."""
    if not interpret and config is None and _TUNING[0]:
        try:
            _tuned(fn, key_args)[lambda meta: (D, _cdiv(N, meta['BLOCK_N']))](*args, **consts, UPCAST=False)
            return
        except (TypeError, AttributeError, KeyError, IndexError) as e:   # an autotuner API this Triton lacks
            _TUNING[0] = False
            warnings.warn(f'Triton autotuning failed ({type(e).__name__}: {e}); '
                          'using the default launch configuration')
    cfg = config or default
    _kernel(fn, interpret)[(D, _cdiv(N, cfg.block_n))](
        *args, **consts, BLOCK_N=cfg.block_n, RELOAD=cfg.reload, UPCAST=interpret, num_warps=cfg.num_warps)


# ---- as torch ops, so that torch.compile keeps the kernels in its graphs -----------------------------------

@torch.library.custom_op('sequencer_triton::lstm2d_forward', mutates_args=())
def _forward_op(xp: torch.Tensor, w_hh: torch.Tensor, rows: torch.Tensor, D: int, N: int, hidden: int,
                save: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    R = xp.shape[0]
    y = torch.empty(R + 1, hidden, device=xp.device, dtype=xp.dtype)
    y[R].zero_()   # the state before the first step: the backward reads h_{t-1} by row, row R for a first step
    saved = lstm_recurrence_triton(xp, w_hh, rows, D, N, hidden, y, save, R=R)
    if saved is None:
        saved = (xp.new_empty(0, dtype=_saved_dtype(w_hh.dtype)), xp.new_empty(0, dtype=_saved_dtype(w_hh.dtype)))
    return (y, *saved)


@_forward_op.register_fake
def _(xp, w_hh, rows, D, N, hidden, save):
    T = rows.shape[0]
    keep = _saved_dtype(w_hh.dtype)
    y = xp.new_empty(xp.shape[0] + 1, hidden)
    if not save:
        return y, xp.new_empty(0, dtype=keep), xp.new_empty(0, dtype=keep)
    return y, xp.new_empty(T, D, N, 4 * hidden, dtype=keep), xp.new_empty(T, D, N, hidden, dtype=keep)


@torch.library.custom_op('sequencer_triton::lstm2d_backward', mutates_args=())
def _backward_op(gy: torch.Tensor, act: torch.Tensor, cs: torch.Tensor, w_hh: torch.Tensor,
                 rows: torch.Tensor, D: int, N: int, hidden: int) -> torch.Tensor:
    R = gy.shape[0]
    dxp = torch.empty(R, 4 * hidden, device=gy.device, dtype=w_hh.dtype)
    lstm_backward_triton(gy, act, cs, w_hh, rows, D, N, hidden, dxp, R=R)
    return dxp


@_backward_op.register_fake
def _(gy, act, cs, w_hh, rows, D, N, hidden):
    return gy.new_empty(gy.shape[0], 4 * hidden, dtype=w_hh.dtype)


def forward(xp: torch.Tensor, w_hh: torch.Tensor, rows: torch.Tensor, D: int, N: int, hidden: int,
            save: bool) -> Tuple[torch.Tensor, ...]:
    """(y (R + 1, h) in xp's dtype, act, cs) for xp (R, 4h): the op form of ``lstm_recurrence_triton``. Row R of
    y is zero (h before the first step, which the backward's weight gradient reads by row)."""
    return torch.ops.sequencer_triton.lstm2d_forward(xp, w_hh, rows, D, N, hidden, save)


def backward(gy: torch.Tensor, act: torch.Tensor, cs: torch.Tensor, w_hh: torch.Tensor,
             rows: torch.Tensor, D: int, N: int, hidden: int) -> torch.Tensor:
    """dxp (R, 4h) in w_hh's dtype for gy (R, h): the op form of ``lstm_backward_triton``."""
    return torch.ops.sequencer_triton.lstm2d_backward(gy, act, cs, w_hh, rows, D, N, hidden)
