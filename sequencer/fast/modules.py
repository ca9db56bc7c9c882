"""The fast modules: subclasses of the plain layers that keep their parameters (and so their state_dict keys) and
run fused paths where they apply, the plain forward everywhere else.

Each one decides per call from what it is given (device, dtype, autocast, gradients, hooks, tracing), because
one model instance meets all of these: training and evaluation, CPU and GPU, eager and compiled. Inside traced
or exported graphs, and where hooks must see a submodule's own call, they run the plain forward.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, register_notrace_module
from timm.layers.format import Format
from torch import nn
from torch.utils import _python_dispatch

from ..models.blocks import RNN2D, Downsample2D, SequencerBlock
from . import autotune, cpu_kernel, gemm, lstm2d
from .ops import conv_as_gemm, fused_mlp, linear_into_ok, linear_residual, norm_residual, patch_linear, plain_linear
from .rules import auto_engine
from .runtime import (
    autocast_dtype,
    cpu_float32,
    cpu_kernel_ok,
    exporting_graph,
    functorch_active,
    gpu_path,
    tracing,
    triton_ok,
    unhooked,
)

ENGINES = ('auto', 'native', 'fused')


class FastModule:
    """Mixin of the fast modules. TorchScript cannot compile them: scripting turns each back into its plain class
    (``PLAIN``), in place, so a scripted model is the paper's model with the same weights."""

    def __prepare_scriptable__(self):
        to_plain(self)
        return self


def _inactive_dropout(m: nn.Module, training: bool) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and (m.p == 0 or not training))


@register_notrace_module
class FastLinear(FastModule, nn.Linear):
    """``nn.Linear`` whose GEMMs run on the faster of MKL and oneDNN on CPU in float32 (``gemm.linear``: the
    classifier head, and the linear layers of paths that do not fuse); elsewhere ``F.linear``."""

    plain_linear = True   # computes exactly nn.Linear's forward: fused paths may use its weights directly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tracing():
            return F.linear(x, self.weight, self.bias)
        return gemm.linear(x, self.weight, self.bias)


@register_notrace_module
class FastMlp(FastModule, Mlp):
    """timm's ``Mlp`` running ``fused_mlp`` on CPU in float32 (exact GELU, no dropout in effect, no hidden norm,
    plain hook-free fc1 / act / fc2); ``forward(x, residual)`` gives ``residual + MLP(x)``. ``fused = False``
    keeps timm's forward."""

    fused: bool = True
    takes_residual = True   # forward(x, residual) is residual + forward(x)

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` takes the fused path."""
        if not self.fused or tracing() or not cpu_float32(x):
            return False
        fc1, fc2 = self.fc1, self.fc2
        if not (plain_linear(fc1) and plain_linear(fc2) and fc1.bias is not None
                and fc2.bias is not None and isinstance(self.norm, nn.Identity)
                and type(self.act) is nn.GELU and self.act.approximate == 'none'
                and _inactive_dropout(self.drop1, self.training) and _inactive_dropout(self.drop2, self.training)
                and unhooked(fc1, self.act, fc2, self.norm, self.drop1, self.drop2)):
            return False
        if any(p.dtype != torch.float32 for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)):
            return False
        return cpu_kernel_ok()

    def residual_bias(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """fc2's bias where the fused path would run on x: a residual that already holds it is then accumulated
        onto in place (``forward(x, residual, bias_in_residual=True)``); else None."""
        return self.fc2.bias if self.fusable(x) else None

    def forward_into(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``forward(x, residual, bias_in_residual=True)`` without deciding again: for a caller to whom
        ``residual_bias`` just gave fc2's bias for an input like x, and who wrote it into ``residual``
        (``FastSequencerBlock``)."""
        return fused_mlp(self, x, residual, bias_in_residual=True)

    def casts_input(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` reads x only through a plain, hook-free fc1 (under autocast: only its cast to the
        autocast dtype), so that a pre-norm may hand x over in that dtype."""
        return plain_linear(self.fc1) and unhooked(self, self.fc1)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                bias_in_residual: bool = False) -> torch.Tensor:
        if tracing() and not torch.compiler.is_compiling():
            y = Mlp.forward(self, x)
            return y if residual is None else residual + y
        res_ok = residual is None or (cpu_float32(residual)
                                      and residual.shape == (*x.shape[:-1], self.fc2.out_features))
        if bias_in_residual:
            if residual is None or not (self.fusable(x) and res_ok and residual.is_contiguous()):
                raise ValueError('FastMlp: bias_in_residual needs a float32 CPU residual of the output shape and '
                                 'the fused path (see residual_bias)')
            return self.forward_into(x, residual)
        if self.fusable(x) and res_ok:
            return fused_mlp(self, x, residual)
        y = Mlp.forward(self, x)
        return y if residual is None else residual + y


@register_notrace_module
class FastRNN2D(FastModule, RNN2D):
    """``RNN2D`` whose recurrences run on ``engine``: 'fused' (``lstm2d``: all directions at once, in the compiled
    CPU kernel, the Triton kernels or the torch implementation), 'native' (``nn.LSTM``) or 'auto': per call, the
    rule table (``rules.auto_engine``), or in eager mode (on CPU, and on CUDA with Triton) the faster of the two
    as measured the first time a shape runs on this processor and cached on disk (``autotune``;
    ``SEQUENCER_AUTOTUNE=0`` turns it off).
    GRU / tanh-RNN / stacked recurrences, torch.func transforms and exported graphs (ONNX, TorchScript tracing,
    torch.export, FX) always run the plain ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``."""

    engine: str = 'auto'
    takes_residual = True   # forward(x, residual) is residual + forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, engine={self.engine!r}"

    def resolved_engine(self, x: Optional[torch.Tensor] = None, compiling: Optional[bool] = None) -> str:
        """The engine that runs for input ``x`` (without ``x``: for the module's device, as last decided for the
        current grad mode and autocast) right now, or with ``compiling=True``, inside a torch.compile graph."""
        return self.engine_decision(x, compiling)[0]

    def engine_decision(self, x: Optional[torch.Tensor] = None,
                        compiling: Optional[bool] = None) -> Tuple[str, str]:
        """(engine, how it was decided): 'set' (a forced engine, or one the layer cannot run otherwise), 'rule'
        (``rules.auto_engine``) or 'measured' (``autotune.choose``: in eager mode, on CPU with float32 weights or
        on CUDA with the Triton kernels, the first call of a shape on this processor times both engines on a copy
        of ``x``; later calls read the cached choice)."""
        if self.rnn_layer != 'lstm' or self.num_layers != 1 or functorch_active() or exporting_graph():
            return 'native', 'set'
        if not torch.compiler.is_compiling() and not unhooked(*(m for m in (self.rnn_v, self.rnn_h) if m is not None)):
            return 'native', 'set'   # the fused recurrence never calls the hooked nn.LSTM modules (or global hooks;
            # Dynamo cannot look at an nn.LSTM: compiled graphs keep the fused path, as before)
        if self.engine != 'auto':
            return self.engine, 'set'
        params = self._lstm_params()[1]
        ref = x if x is not None else params[0]
        device = ref.device.type
        grad = torch.is_grad_enabled() and (ref.requires_grad or any(
            p is not None and p.requires_grad for p in params))
        amp = autocast_dtype(device)
        if compiling is None:
            compiling = torch.compiler.is_compiling()
        if device == 'cuda':
            kernel = triton_ok() and _triton_supported(self.hidden_size, amp is not None)
        elif device == 'cpu':
            kernel = cpu_kernel.loaded() if compiling else cpu_kernel_ok()   # tracing never builds the kernel
        else:
            kernel = False
        # under autocast the engines cast the input to the autocast dtype: what matters is the weights' dtype
        dtype = params[0].dtype if amp is not None else ref.dtype
        rule = auto_engine(device, dtype, amp is not None, grad or compiling, kernel)
        if compiling or tracing():
            return rule, 'rule'
        # eager: the decision is remembered per grad mode and autocast dtype (``autotune.describe`` reports them)
        mode = ('train' if grad else 'infer') + (f' {str(amp).replace("torch.", "")}' if amp is not None else '')
        decisions = self.__dict__.setdefault('_decisions', {})
        if x is None:   # no shape to measure: what the last call in this mode measured, else the rule
            last = decisions.get(mode)
            return last if last is not None and last[1] == 'measured' else (rule, 'rule')
        if (autotune.measuring() or _python_dispatch._get_current_dispatch_mode()
                or not unhooked(self, *(m for m in (self.rnn_v, self.rnn_h, self.fc) if m is not None))):
            return rule, 'rule'   # inside a measurement, FLOP counting or fake tensors, hooks: nothing timed
        measurable = ((device == 'cpu' and params[0].dtype == dtype == torch.float32)
                      or (device == 'cuda' and kernel))   # without Triton the fused engine is no candidate there
        if measurable and autotune.enabled():
            decision = (self._measured_engine(x, grad, amp, kernel), 'measured')
        else:
            decision = (rule, 'rule')
        if decisions.get(mode) != decision:
            decisions[mode] = decision
        return decision

    def _measured_engine(self, x: torch.Tensor, grad: bool, amp: Optional[torch.dtype], kernel: bool) -> str:
        """The faster engine for inputs shaped like ``x`` in this grad mode and autocast, on this processor: cached,
        or timed now on a copy of ``x`` (forward, and with ``grad`` the backward of the sum, gradients taken with
        ``torch.autograd.grad``: no parameter's ``.grad`` is touched)."""
        memo = self.__dict__.setdefault('_measured', {})   # this layer's answers, without rebuilding the key
        memo_key = (tuple(x.shape), x.dtype, grad, amp, kernel, torch.get_num_threads(),
                    gemm.forward_kind(not grad))
        if memo_key not in memo:
            memo[memo_key] = self._measure(x, grad, amp, kernel)
        return memo[memo_key]

    def _measure(self, x: torch.Tensor, grad: bool, amp: Optional[torch.dtype], kernel: bool) -> str:
        B, H, W, C = x.shape
        device = x.device.type
        if device == 'cpu':
            # the GEMM backends are chosen first (``gemm``: measured once per kind), and named in the key
            kinds = gemm.KINDS if grad else (gemm.forward_kind(True),)
            setting = (f"fused={'kernel' if kernel else 'torch'} threads={torch.get_num_threads()} "
                       f"gemm={'+'.join(gemm.backend(k) for k in kinds)}")
        else:
            setting = f"fused={'triton' if kernel else 'torch'}"
        key = (f"{device} {B}x{H}x{W}x{C} hidden={self.hidden_size} union={self.union} "
               f"bidirectional={self.bidirectional} fc={self.fc is not None} {str(x.dtype).replace('torch.', '')} "
               f"{'train' if grad else 'infer'} autocast={str(amp).replace('torch.', '')} {setting}")
        x = x.detach().requires_grad_(x.requires_grad)
        x1 = x[:1].detach().requires_grad_(x.requires_grad)   # the warm-up's input

        def fused(x):
            y = lstm2d.fused_rnn2d(self, x)
            return self.fc(y) if self.fc is not None else y

        def native(x):
            return RNN2D.forward(self, x)

        def step(forward, x):
            if not grad:
                with torch.no_grad():
                    return forward(x)
            y = forward(x)
            inputs = ([x] if x.requires_grad else []) + [p for p in self.parameters() if p.requires_grad]
            return torch.autograd.grad(y.float().sum(), inputs)

        # the measurement's own graphs keep their saved tensors as they are, even inside a checkpointed forward
        # (whose saved-tensor hooks would otherwise take them over)
        with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            return autotune.choose(key, {'fused': lambda: step(fused, x), 'native': lambda: step(native, x)},
                                   warmup={'fused': lambda: step(fused, x1), 'native': lambda: step(native, x1)},
                                   device=device)

    def _lstm_params(self):
        """((vertical, reverse) per direction, (w_ih, w_hh, b_ih, b_hh) per direction) for the fused engine, in
        the channel order of the plain output (vertical before horizontal, forward before backward).

        Read afresh on every eager call (the parameters of the moment: assigned, parametrized, swapped by
        ``functional_call``). torch.compile cannot trace ``nn.LSTM`` at all, so a compiled graph reads the
        ``nn.LSTM``s' parameter dicts, kept from the last eager call or ``set_engine``: parameters replaced in
        them since (``load_state_dict(assign=True)``, ``to_empty``) are the ones used."""
        if not torch.compiler.is_compiling():
            modules = self._modules
            rnns = (modules.get('rnn_v'), modules.get('rnn_h'))
            signature = _rnn_signature(rnns)
            refs = self.__dict__.get('_lstm_refs')
            if refs is not None and refs[3] == signature:
                kinds, where = refs[0], refs[2]
            else:
                kinds, where = [], []
                for rnn, vertical in zip(rnns, (True, False)):
                    if rnn is None:
                        continue
                    for reverse in ((False, True) if rnn.bidirectional else (False,)):
                        sfx = '_l0_reverse' if reverse else '_l0'
                        kinds.append((vertical, reverse))
                        where += [(rnn, rnn._parameters, name + sfx)
                                  for name in ('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh')]
                kinds, where = tuple(kinds), tuple(where)
            # a registered parameter is read from its module's dict; others (parametrized) through getattr
            params = tuple(d[name] if name in d else getattr(rnn, name, None) for rnn, d, name in where)
            self.__dict__['_lstm_refs'] = (kinds, params, where, signature)
            return kinds, params
        kinds, kept, where, _ = self.__dict__['_lstm_refs']
        return kinds, tuple(d[name] if name in d else p for (_, d, name), p in zip(where, kept))

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``.to()``, ``.float()``, ``.cpu()``, ...), then the LSTM parameters flattened again
        where they are CPU float32 (``lstm2d.flatten_weights``), as ``nn.LSTM`` does for cuDNN."""
        module = super()._apply(fn, recurse)
        lstm2d.flatten_weights(self)
        return module

    def casts_input(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` reads x only through its cast to the autocast dtype (the fused engine does, under
        autocast), so that a pre-norm may hand x over in that dtype."""
        return self.resolved_engine(x) == 'fused' and unhooked(self)

    def residual_bias(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """fc's bias where a residual that already holds it can be accumulated onto in place
        (``forward(x, residual, bias_in_residual=True)``); else None."""
        if self.fc is not None and linear_into_ok(self.fc, x) and self.resolved_engine(x) == 'fused':
            return self.fc.bias
        return None

    def forward_into(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``forward(x, residual, bias_in_residual=True)`` without deciding the engine again: for a caller to whom
        ``residual_bias`` just gave fc's bias for an input like x, and who wrote it into ``residual``
        (``FastSequencerBlock``)."""
        return linear_residual(self.fc, lstm2d.fused_rnn2d(self, x), residual, bias_in_residual=True)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                bias_in_residual: bool = False) -> torch.Tensor:
        """The mixed tokens, or ``residual +`` them; with ``bias_in_residual`` the residual already holds fc's
        bias and is accumulated onto in place (see ``residual_bias``)."""
        if self.resolved_engine(x) != 'fused':
            if bias_in_residual:
                raise ValueError('FastRNN2D: bias_in_residual needs the fused engine (see residual_bias)')
            y = RNN2D.forward(self, x)
            return y if residual is None else residual + y
        if bias_in_residual and self.fc is not None:
            return self.forward_into(x, residual)
        y = lstm2d.fused_rnn2d(self, x)
        if self.fc is not None:
            return linear_residual(self.fc, y, residual)
        if bias_in_residual:
            raise ValueError('FastRNN2D: bias_in_residual needs the fc layer')
        return y if residual is None else residual + y


def _rnn_signature(rnns) -> Tuple:
    """What the parameter table of ``FastRNN2D._lstm_params`` depends on: the recurrences, their parameter dicts and
    their directions."""
    return tuple((id(rnn), id(rnn._parameters), rnn.bidirectional) if rnn is not None else None for rnn in rnns)


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


def _triton_supported(hidden: int, lowp: bool) -> bool:
    from . import triton_lstm  # optional dependency (triton)
    return triton_lstm.supported(hidden, lowp)


@register_notrace_module
class FastSequencerBlock(FastModule, SequencerBlock):
    """``SequencerBlock`` with its residual adds handed to the branches' last linear layers.

    Where DropPath does nothing (eval mode, or rate 0) and both branches are fast modules without hooks, each
    residual add becomes part of the branch's last GEMM (``forward(y, residual=x)``): on CPU in float32 the GEMM
    accumulates onto ``x + bias``, which the pre-norm's kernel writes in its own pass over x (``norm_residual``),
    and in the backward the gradients reaching x through the pre-norm and through the residual are summed inside
    the norm's backward. On the GPU path the pre-norms run as Triton kernels that also sum the residual's
    gradient, and write their output in the autocast dtype where the branch reads it only through that cast.
    ``fused_residual`` / ``fused_norm`` = False turn these off.
    """

    fused_residual: bool = True
    fused_norm: bool = True

    def _residual_into_branches(self) -> bool:
        dp = self.drop_path
        inactive = type(dp) is nn.Identity or (type(dp) is DropPath and (not dp.training or dp.drop_prob == 0))
        return (self.fused_residual and inactive
                and getattr(self.rnn_tokens, 'takes_residual', False)
                and getattr(self.mlp_channels, 'takes_residual', False)
                and unhooked(self.rnn_tokens, self.mlp_channels, dp))

    def _casts_input(self, branch: nn.Module, x: torch.Tensor) -> bool:
        if not (self.fused_norm and gpu_path(x)):
            return False
        casts = getattr(branch, 'casts_input', None)
        return casts is not None and casts(x)

    def _residual_branch(self, norm: nn.Module, branch: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x + branch(norm(x)), the residual handed to the branch; where the branch can accumulate onto a residual
        that already holds its last bias, the norm writes x + bias in its own pass over x."""
        get_bias = getattr(branch, 'residual_bias', None)
        probe = x   # the branch decides (e.g. its measured engine, per grad mode) for its input, norm(x)
        if torch.is_grad_enabled() and not x.requires_grad and any(p.requires_grad for p in norm.parameters()):
            probe = x.detach().requires_grad_()
        bias = get_bias(probe) if get_bias is not None and x.is_contiguous() else None
        y, r = norm_residual(norm, x, bias, lowp_out=bias is None and self._casts_input(branch, x),
                             gpu_kernels=self.fused_norm)
        if bias is None:
            return branch(y, residual=r)
        # residual_bias decided for this input (and the branches have no hooks): the path is not decided again
        return branch.forward_into(y, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tracing() and not torch.compiler.is_compiling():
            return SequencerBlock.forward(self, x)
        if self._residual_into_branches():
            x = self._residual_branch(self.norm1, self.rnn_tokens, x)
            return self._residual_branch(self.norm2, self.mlp_channels, x)
        for norm, branch in ((self.norm1, self.rnn_tokens), (self.norm2, self.mlp_channels)):
            y, x = norm_residual(norm, x, lowp_out=self._casts_input(branch, x), gpu_kernels=self.fused_norm,
                                 cpu_kernels=False)
            x = x + self.drop_path(branch(y))
        return x


@register_notrace_module
class FastDownsample2D(FastModule, Downsample2D):
    """``Downsample2D`` whose convolution (kernel = stride) runs on CPU as one GEMM over the patches
    (``patch_linear``), the same sum, writing NHWC directly; elsewhere the convolution, its output made contiguous
    so that every later layer reads contiguous NHWC tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if conv_as_gemm(self.down, x):
            return patch_linear(x, self.down)
        return Downsample2D.forward(self, x).contiguous()


@register_notrace_module
class FastPatchEmbed(FastModule, PatchEmbed):
    """timm's ``PatchEmbed`` (as the NHWC stem: no flattening, no fixed image size) whose convolution runs on CPU as
    one GEMM over the gathered patches, writing NHWC directly; elsewhere timm's forward, made contiguous."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.img_size is None and not self.dynamic_img_pad and not self.flatten
                and self.output_fmt == Format.NHWC and conv_as_gemm(self.proj, x, channels_first=True)
                and unhooked(self)):
            return self.norm(patch_linear(x, self.proj, channels_first=True))
        return PatchEmbed.forward(self, x).contiguous()


# the plain class -> its fast subclass, and back
FAST = {RNN2D: FastRNN2D, SequencerBlock: FastSequencerBlock, Mlp: FastMlp, Downsample2D: FastDownsample2D,
        PatchEmbed: FastPatchEmbed, nn.Linear: FastLinear}
PLAIN = {fast: plain for plain, fast in FAST.items()}
_SETTINGS = ('engine', 'fused', 'fused_norm', 'fused_residual', '_lstm_refs', '_decisions', '_measured')


def to_plain(module: nn.Module) -> None:
    """Turn one fast module back into its plain class (its own settings dropped); others are left as they are."""
    plain = PLAIN.get(type(module))
    if plain is not None:
        module.__class__ = plain
        for name in _SETTINGS:
            module.__dict__.pop(name, None)


def set_engine(model: nn.Module, engine: str = 'auto', *, fused_mlp: bool = True, fused_norm: bool = True,
               fused_residual: bool = True) -> nn.Module:
    """Make ``model`` run on ``engine``, in place, and return it.

    'native': every fast module back to its plain class (the paper's model: ``nn.LSTM``, timm's layers).
    'fused' / 'auto': the plain layers replaced by their fast subclasses (``FAST``, exact types only: a subclass
    of a user's own is left alone), the recurrences on the fused engine ('fused') or chosen per call ('auto':
    ``rules.auto_engine``, or the measured, cached choice of ``autotune`` on CPU). Setting 'fused' or 'native' is
    how a choice is forced. ``fused_mlp`` / ``fused_norm`` / ``fused_residual`` = False leave out the fused channel
    MLP, the GPU pre-norm kernels, or the residual adds inside the branches' GEMMs. Parameters, buffers and
    state_dict keys do not change.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    for m in model.modules():
        if engine == 'native':
            to_plain(m)
            continue
        fast = FAST.get(type(m))
        if fast is not None:
            m.__class__ = fast
        if isinstance(m, FastRNN2D):
            m.engine = engine
            m._lstm_params()   # the references a graph compiled before any eager call reads
            lstm2d.flatten_weights(m)
        elif isinstance(m, FastMlp):
            m.fused = fused_mlp
        elif isinstance(m, FastSequencerBlock):
            m.fused_norm, m.fused_residual = fused_norm, fused_residual
    return model


def engine_of(model: nn.Module) -> str:
    """The engine ``model`` was set to: 'native' when it holds no fast module, else its BiLSTM2Ds' setting."""
    engines = {m.engine for m in model.modules() if isinstance(m, FastRNN2D)}
    if not any(isinstance(m, FastModule) for m in model.modules()):
        return 'native'
    return engines.pop() if len(engines) == 1 else ('mixed' if engines else 'auto')
