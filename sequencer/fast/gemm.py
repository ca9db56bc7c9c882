"""The fast engine's float32 GEMMs on CPU, through MKL or oneDNN: whichever this processor runs faster.

PyTorch multiplies float32 matrices on CPU with MKL's sgemm. On some processors MKL does not run at the
processor's speed (measured: an AMD EPYC Zen 5, where MKL reached 180-210 GFLOP/s on this model's shapes and
oneDNN 430-480 on 2 cores), while oneDNN, which PyTorch also carries (its LSTM, its convolutions), does. On Intel
processors MKL is as fast or faster. So every GEMM of the fast engine on CPU in float32 goes through this module:

* the fused BiLSTM2D's input projection and its input and weight gradients (``lstm2d``),
* the fused channel MLP, forward and backward (``ops.fused_mlp``),
* the fusing ``fc`` with its residual add (``ops.linear_residual``), the patch GEMMs of the stem and the
  downsampling layers (``ops.patch_linear``),
* every other ``nn.Linear`` of a fast model (``FastLinear``: the classifier head, and the layers of paths that do
  not fuse).

Backends: 'mkl' is PyTorch's own ``torch.mm`` / ``addmm`` (MKL's sgemm); 'onednn' is oneDNN's inner product, the op
torch.compile's CPU backend calls (``torch.ops.mkldnn._linear_pointwise``), with the residual add of a branch as
its binary post-op. Both compute float32 products with float32 accumulation; they differ only by summation order
(relative differences about 1e-6, tested against ``F.linear``). A GEMM ``A @ B`` is handed to oneDNN as
``X @ W^T`` with ``X = A`` (row-major; copied only when it is not, as for the weight gradient's ``dY^T``) and
``W = B^T``, a view in whatever strides it has; a weight gradient ``dY^T @ X`` goes to oneDNN's inner-product weight
gradient, with both operands copied into oneDNN's layout.

The choice is made per kind of GEMM, because that is what the winner was seen to depend on, besides the
processor: 'forward' (``X @ W^T``, weights in their own layout), 'input_grad' (``dY @ W``) and 'weight_grad'
(``dY^T @ X``, two activations), and 'packed_forward': a forward GEMM of inference with packing on
(``set_packing``), MKL against oneDNN with the weight packed once, which can win where unpacked oneDNN loses (and
lose where MKL is fastest, as on Intel). The first time a kind runs in a process, the cached choice for this
processor, torch version and thread count is read (``autotune``), else both backends are timed on two of
Sequencer2D-S's shapes (a few tens of milliseconds) and the faster is cached on disk. ``SEQUENCER_GEMM=mkl`` /
``onednn``, or ``set_backend``, forces a backend; ``SEQUENCER_AUTOTUNE=0`` turns measuring off, and MKL runs.
Where PyTorch's own MKL is restricted (``MKL_ENABLE_INSTRUCTIONS``), the key says so. Under torch.compile,
tracing and export, the GEMMs are PyTorch's own ops (the compiler chooses there).
"""
import contextlib
import os
import threading
import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import UserError
from . import autotune
from .runtime import apply, plain_backward

BACKENDS = ('mkl', 'onednn')
KINDS = ('forward', 'input_grad', 'weight_grad')
PACKED = 'packed_forward'   # a forward GEMM of inference with packing on: a choice of its own (``forward_kind``)
ENV = 'SEQUENCER_GEMM'
PACK_ENV = 'SEQUENCER_PACK_WEIGHTS'

_forced: Dict[str, Optional[str]] = {'backend': None, 'packing': None}
_lock = threading.RLock()


def available() -> bool:
    """Whether this PyTorch build has oneDNN's inner product (x86 and ARM builds with MKLDNN)."""
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise'))


def set_backend(name: Optional[str]) -> None:
    """Force every fast CPU GEMM onto 'mkl' or 'onednn'; 'auto' or None goes back to the measured choice (or
    ``SEQUENCER_GEMM``)."""
    if name not in (None, 'auto') + BACKENDS:
        raise ValueError(f"GEMM backend must be 'auto', 'mkl' or 'onednn', got {name!r}")
    _forced['backend'] = None if name in (None, 'auto') else name


def forced() -> Optional[str]:
    """The backend set by ``set_backend`` or ``SEQUENCER_GEMM``, else None ('auto')."""
    if _forced['backend'] is not None:
        return _forced['backend']
    env = os.environ.get(ENV, '').strip().lower()
    if env in ('', 'auto'):
        return None
    if env not in BACKENDS:
        raise UserError(f"{ENV} must be 'auto', 'mkl' or 'onednn', got {env!r}")
    return env


def forward_kind(pack: bool) -> str:
    """The kind whose choice a forward GEMM follows: ``PACKED`` when its weight would be used packed (``pack``: the
    caller records no graph; grad mode off; packing on), else 'forward'. MKL against oneDNN with packed weights is
    measured on its own, because packing is what makes oneDNN win on some processors and not on others."""
    return PACKED if pack and not torch.is_grad_enabled() and packing() else 'forward'


def backend(kind: str) -> str:
    """The backend of GEMMs of ``kind`` (one of ``KINDS`` or ``PACKED``) in this process right now."""
    if torch.compiler.is_compiling() or not available():
        return 'mkl'
    name = forced()
    if name is not None:
        return name
    if not autotune.enabled():
        return 'mkl'
    key = _key(kind)
    choice = autotune.cached_choice(key)
    if choice not in BACKENDS:
        with _lock:
            choice = _measure(kind, key)
    return choice


def describe() -> str:
    """The backends chosen so far in this process, e.g. ``forward: onednn, input_grad: onednn, weight_grad: mkl``,
    and ``; oneDNN weights packed`` when packing is on."""
    packed = '; oneDNN weights packed' if available() and packing() else ''
    name = forced()
    if name is not None:
        return f"{name} (set)" + packed
    if not available():
        return 'mkl (oneDNN not in this build)'
    if not autotune.enabled():
        return 'mkl (measuring off)' + packed
    done = [f"{k}: {autotune.cached_choice(_key(k))}" for k in KINDS + (PACKED,) if autotune.cached_choice(_key(k))]
    return ((', '.join(done) + ' (measured)') if done else 'not chosen yet') + packed


# ---- weights packed once for inference -------------------------------------------------------------------------

# weight -> {(rows, shape): (state, packed)}: oneDNN's blocked copies of the weights of forward GEMMs, made the
# first time a weight is used with packing on (for that many rows), remade when the weight is replaced, its
# storage replaced or its values changed in place (``state``), dropped with the weight
# (keyed by identity: tensors compare elementwise)
_packed = WeakIdKeyDictionary()
# owner -> (key, weights): weights derived from parameters (the recurrence's stacked weights), kept while packing
# so that their packed copies are reused (``kept``); their tensors -> True in _stable, packable like Parameters
_kept = WeakIdKeyDictionary()
_stable = WeakIdKeyDictionary()
MAX_PACKED_ROWS = 4   # packed copies kept per weight (one per number of rows; the oldest goes first)


def set_packing(on: Optional[bool]) -> None:
    """Pack the weights of forward GEMMs into oneDNN's layout once and reuse them (inference, oneDNN only); None
    goes back to ``SEQUENCER_PACK_WEIGHTS`` (off unless set to 1). A weight changed through ``.data`` is not seen
    (its version counter does not move): call ``clear_packed()`` after such a change."""
    _forced['packing'] = on


@contextlib.contextmanager
def packing_on():
    """Packed weights inside the block (``set_packing(True)``), the previous setting after it: for processes
    that only run inference on weights they loaded (``sequencer validate``, ``predict``)."""
    before = _forced['packing']
    _forced['packing'] = True
    try:
        yield
    finally:
        _forced['packing'] = before


def packing() -> bool:
    """Whether forward GEMMs on oneDNN use packed weights (outside autograd)."""
    if _forced['packing'] is not None:
        return _forced['packing']
    env = os.environ.get(PACK_ENV, '').strip().lower()
    if env in ('', '0', 'false', 'no', 'off'):
        return False
    if env not in ('1', 'true', 'yes', 'on'):
        raise UserError(f"{PACK_ENV} must be 1 or 0, got {env!r}")
    return True


def clear_packed() -> None:
    """Forget every packed weight and every kept derived weight (they are remade on their next use)."""
    with _lock:
        _packed.clear()
        _kept.clear()
        _stable.clear()


def state(t: torch.Tensor, values: Optional[torch.Tensor] = None) -> tuple:
    """What says that a weight still holds the values a cached copy was made from: its storage (a weak reference:
    a storage replaced through ``.data``, as ``model.half().float()`` does, is a new one even where it lands at the
    old address), where in it ``values`` (default ``t``) start, and ``t``'s version counter (in-place changes)."""
    return (weakref.ref(t.untyped_storage()), (t if values is None else values).data_ptr(), t._version)


def kept(owner: torch.Tensor, key: tuple, make) -> tuple:
    """The tuple of weights (or None) ``make()`` derives from parameters (the fused recurrence's stacked weights),
    kept per ``owner`` while ``key`` (the parameters' identities and versions) stays the same, so that their packed
    copies are reused; their tensors are packed like Parameters. ``clear_packed`` forgets them."""
    hit = _kept.get(owner)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.inference_mode(False):   # tensors with version counters, packable under inference_mode too
        weights = make()
    with _lock:
        for t in weights:
            if t is not None:
                _stable[t] = True
        _kept[owner] = (key, weights)
    return weights


def packed_count() -> int:
    """How many packed weight copies are held (tests, diagnostics)."""
    return sum(len(v) for v in list(_packed.values()))


def _packable(w: torch.Tensor) -> Optional[torch.Tensor]:
    """The tensor to key ``w``'s packed copy on: ``w`` itself or the Parameter (or stable weight) it is a whole view
    of (the same elements in the same order: a convolution's weight seen as a matrix); None when ``w`` is anything
    else (an activation, a slice, a copy), which is never packed, or an inference tensor (made under
    ``torch.inference_mode``: it has no version counter to follow changes by)."""
    owner = w if w._base is None else w._base
    if not (isinstance(owner, nn.Parameter) or owner in _stable) or owner.is_inference():
        return None
    if owner is not w and not (w.data_ptr() == owner.data_ptr() and w.numel() == owner.numel() and (
            (w.shape == owner.shape and w.stride() == owner.stride())
            or (w.is_contiguous() and owner.is_contiguous()))):
        return None
    return owner


def _weight(b: torch.Tensor, rows: int, pack: bool) -> torch.Tensor:
    """The ``W`` of ``X @ W^T`` for oneDNN from ``b = W^T``: packed for ``rows`` rows when packing is on and the
    caller says the GEMM is inference (``pack``: no autograd graph keeps this weight for a backward)."""
    w = b.t()
    if not pack or torch.is_grad_enabled() or not packing():
        return w
    owner = _packable(w)
    if owner is None:
        return w
    version, key = state(owner, w), (rows, tuple(w.shape))
    entries = _packed.get(owner)
    entry = entries.get(key) if entries is not None else None
    if entry is not None and entry[0] == version:
        return entry[1]
    with _lock:
        entries = _packed.setdefault(owner, {})
        entries.pop(key, None)
        while len(entries) >= MAX_PACKED_ROWS:
            entries.pop(next(iter(entries)))
        packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)
        entries[key] = (version, packed)
    return packed


# ---- the measurement -----------------------------------------------------------------------------------------

# (M, K, N) of two of Sequencer2D-S's GEMMs at batch 2: the first stage's fc1 and the third stage's fc1
_SHAPES = ((2048, 192, 768), (512, 384, 1536))


def _operands(kind: str, M: int, K: int, N: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (A, B) of one GEMM of ``kind`` in the layout the fast engine hands over."""
    def rand(*shape):
        return torch.randn(*shape, generator=gen)
    if kind in ('forward', PACKED):
        return rand(M, K), rand(N, K).t()          # x @ W^T
    if kind == 'input_grad':
        return rand(M, N), rand(N, K)              # dY @ W
    return rand(M, N).t(), rand(M, K)              # dY^T @ X


def _key(kind: str) -> str:
    mkl = os.environ.get('MKL_ENABLE_INSTRUCTIONS')
    return (f"gemm {kind} float32 threads={torch.get_num_threads()}"
            + (f" MKL_ENABLE_INSTRUCTIONS={mkl}" if mkl else ''))


def _measure(kind: str, key: str) -> str:
    gen = torch.Generator().manual_seed(0)
    operands = [_operands(kind, M, K, N, gen) for M, K, N in _SHAPES]

    def run(fn):
        def step():
            for a, b in operands:
                fn(a, b)
        return step

    onednn = _ONEDNN[kind]
    if kind == PACKED:   # oneDNN with each weight packed for its number of rows, once, before the timing
        packed = {id(b): torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), a.shape[0]) for a, b in operands}

        def onednn(a, b):
            return torch.ops.mkldnn._linear_pointwise(a, packed[id(b)], None, 'none', [], '')

    candidates = {'mkl': run(torch.mm), 'onednn': run(onednn)}
    return autotune.choose(key, candidates, steps=3, budget_s=0.5, warmup=candidates)


# ---- the GEMMs -------------------------------------------------------------------------------------------------

def _row_major(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and (t.shape[0] <= 1 or t.stride(0) == t.shape[1])


def _onednn_mm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None,
               pack: bool = False) -> torch.Tensor:
    """``a @ b [+ bias]`` by oneDNN's inner product (``X @ W^T`` with ``X = a``, ``W = b^T``, packed when ``pack``
    and packing is on)."""
    if not _row_major(a):
        a = a.contiguous()
    return torch.ops.mkldnn._linear_pointwise(a, _weight(b, a.shape[0], pack), bias, 'none', [], '')


def _onednn_weight_grad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for a weight gradient ``dY^T @ X`` (``a`` the transposed view of a row-major ``dY``) by oneDNN's
    inner-product weight gradient, whose operands are handed over in oneDNN's own layout (a copy of each)."""
    gy = a.t()
    if not _row_major(gy) or gy.shape[0] == 0:
        return _onednn_mm(a, b)
    grad_w, _ = torch.ops.aten.mkldnn_linear_backward_weights(
        gy.to_mkldnn(), b.contiguous().to_mkldnn(), gy.new_empty(a.shape[0], b.shape[1]), False)
    return grad_w


# the oneDNN op of each GEMM kind
_ONEDNN = {'forward': _onednn_mm, PACKED: _onednn_mm, 'input_grad': _onednn_mm, 'weight_grad': _onednn_weight_grad}


def _routed(kind: str, *tensors: torch.Tensor) -> bool:
    """Whether oneDNN runs this GEMM: float32 CPU tensors, the kind's backend, and no autograd graph to record
    (these GEMMs run inside autograd Functions; a double backward's ``create_graph`` needs PyTorch's own, which
    are differentiable)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return (all(t.device.type == 'cpu' and t.dtype == torch.float32 for t in tensors)
            and backend(kind) == 'onednn')


def mm(a: torch.Tensor, b: torch.Tensor, kind: str, pack: bool = False) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` (M, K) and ``b`` (K, N), a GEMM of ``kind``; ``pack``: a forward GEMM of inference,
    whose weight ``b^T`` may be used packed (``set_packing``)."""
    if kind == 'forward':
        kind = forward_kind(pack)
    if _routed(kind, a, b) and a.shape[0] > 0:
        return _onednn_mm(a, b, pack=pack) if kind in ('forward', PACKED) else _ONEDNN[kind](a, b)
    return torch.mm(a, b)


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, pack: bool = False) -> torch.Tensor:
    """``a @ b`` (a 'forward' GEMM) into ``out`` when MKL runs it, else into a fresh tensor; the result is
    returned. ``pack``: see ``mm``."""
    if _routed(forward_kind(pack), a, b) and a.shape[0] > 0:
        return _onednn_mm(a, b, pack=pack)
    return torch.mm(a, b, out=out)


def addmm(bias: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor, pack: bool = False) -> torch.Tensor:
    """``bias + a @ b``, a 'forward' GEMM with a bias of b's columns (or none). ``pack``: see ``mm``."""
    if _routed(forward_kind(pack), a, b) and a.shape[0] > 0:
        return _onednn_mm(a, b, bias, pack)
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def add_mm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None,
           pack: bool = False) -> torch.Tensor:
    """``c [+ bias] + a @ b`` for a 2-D ``c`` (M, N): with MKL accumulated onto ``c`` in place when there is no
    bias, else onto ``c + bias``; with oneDNN the sum is the GEMM's post-op, into a fresh tensor. The result is
    returned (``c`` itself only when accumulated in place). ``pack``: see ``mm``."""
    if _routed(forward_kind(pack), a, b, c) and a.shape[0] > 0:
        if not _row_major(a):
            a = a.contiguous()
        return torch.ops.mkldnn._linear_pointwise.binary(a, c.contiguous(), _weight(b, a.shape[0], pack), bias,
                                                         'add')
    return (c if bias is None else torch.add(c, bias)).addmm_(a, b)


class _Linear(torch.autograd.Function):
    """``F.linear`` whose three GEMMs go through ``mm`` (float32 CPU tensors)."""

    @staticmethod
    def forward(ctx, x, weight, bias, record):
        # record: whether autograd records this call (grad mode at apply; needs_input_grad follows requires_grad
        # even under no_grad)
        x2 = x.reshape(-1, x.shape[-1])
        if record:   # x itself (not x2, made here without a graph): a double backward differentiates it
            ctx.save_for_backward(x, weight)
            ctx.has_bias = bias is not None
        return addmm(bias, x2, weight.t(), pack=not record).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        g2 = gy.reshape(-1, weight.shape[0])
        dx, dw = linear_grads(g2, x, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def linear_grads(g2: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool,
                 need_w: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The input and weight gradients of ``x @ weight.T`` given the output's gradient ``g2`` (2-D), for a
    backward: through ``mm`` on the chosen backends, or through ``torch.mm`` where the backward must be
    differentiable or batchable (``plain_backward``)."""
    x2 = x.reshape(-1, x.shape[-1])
    if plain_backward(g2):
        return (torch.mm(g2, weight).view(x.shape) if need_x else None), (torch.mm(g2.t(), x2) if need_w else None)
    return (mm(g2, weight, 'input_grad').view(x.shape) if need_x else None,
            mm(g2.t(), x2, 'weight_grad') if need_w else None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, its GEMMs on the chosen backend for float32 CPU tensors outside autocast."""
    if (x.device.type == 'cpu' and x.dtype == weight.dtype == torch.float32 and x.dim() >= 1 and x.numel() > 0
            and not torch.is_autocast_enabled('cpu') and (bias is None or bias.dtype == torch.float32)):
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        forward = backend(forward_kind(not torch.is_grad_enabled()))
        if forward == 'onednn' or (grad and 'onednn' in (backend('input_grad'), backend('weight_grad'))):
            return apply(_Linear, x, weight, bias, torch.is_grad_enabled())
    return F.linear(x, weight, bias)
