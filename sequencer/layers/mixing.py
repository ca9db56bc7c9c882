"""Token mixing with recurrent networks: BiLSTM2D (and its GRU / tanh-RNN siblings) and the 1D mixer.

Tensors are NHWC. ``RNN2D`` runs a vertical RNN down every column and a horizontal RNN along every
row, then unites them (``union``: 'cat', 'add', 'vertical' or 'horizontal') and, ``with_fc``, fuses the
result back to the channel width with a Linear layer. The recurrent weights live in ordinary
``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` modules (``rnn_v`` / ``rnn_h``), so checkpoints of the reference
code and of timm load unchanged whichever engine computes the recurrence.
"""
from typing import Optional

import torch
from torch import nn

from .fused_mlp import _functorch_active, _unhooked, linear_into_ok, linear_residual

RNN_CLASSES = {'lstm': nn.LSTM, 'gru': nn.GRU, 'rnn': nn.RNN}
UNIONS = ('cat', 'add', 'vertical', 'horizontal')
ENGINES = ('auto', 'native', 'fused')


def _rnn_class(rnn_layer: str):
    if rnn_layer not in RNN_CLASSES:
        raise ValueError(f"rnn_layer must be one of {sorted(RNN_CLASSES)}, got {rnn_layer!r}")
    return RNN_CLASSES[rnn_layer]


class RNN2D(nn.Module):
    """Vertical + horizontal (bi)directional RNN over an NHWC token grid (the paper's BiLSTM2D)."""

    def __init__(
            self,
            input_size: int,
            hidden_size: int,
            num_layers: int = 1,
            bias: bool = True,
            bidirectional: bool = True,
            union: str = 'cat',
            with_fc: bool = True,
            rnn_layer: str = 'lstm',
    ):
        super().__init__()
        if union not in UNIONS:
            raise ValueError(f"union must be one of {UNIONS}, got {union!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.union = union
        self.with_fc = with_fc
        self.rnn_layer = rnn_layer
        self.output_size = 2 * hidden_size if bidirectional else hidden_size
        self.with_vertical = union != 'horizontal'
        self.with_horizontal = union != 'vertical'
        union_size = 2 * self.output_size if union == 'cat' else self.output_size
        if not with_fc and union_size != input_size:
            raise ValueError(
                f"with_fc=False needs the RNN output width to equal the channel width, but union={union!r} "
                f"with hidden_size={hidden_size} (bidirectional={bidirectional}) gives {union_size} "
                f"channels for input width {input_size}")
        cls = _rnn_class(rnn_layer)
        make = lambda: cls(input_size, hidden_size, num_layers, batch_first=True, bias=bias,
                           bidirectional=bidirectional)
        self.rnn_v = make() if self.with_vertical else None
        self.rnn_h = make() if self.with_horizontal else None
        self.fc = nn.Linear(union_size, input_size) if with_fc else None
        self.engine = 'auto'
        self._lstm_params()

    def extra_repr(self) -> str:
        return f"union={self.union!r}, with_fc={self.with_fc}, engine={self.engine!r}"

    def resolved_engine(self, x: Optional[torch.Tensor] = None, compiling: Optional[bool] = None) -> str:
        """The engine that runs for input ``x`` (or, without ``x``, for the module's device) right now, or,
        with ``compiling=True``, inside a torch.compile graph.

        'native' and 'fused' are taken as set, except that GRU / tanh-RNN / stacked (num_layers > 1)
        recurrences, and every recurrence under torch.func transforms, run natively (the fused engine covers
        single-layer LSTMs outside such transforms). 'auto' follows what
        was measured to be faster (see ``auto_engine``): it depends on the device, on whether gradients
        are being computed, on the dtype and on autocast; while tracing or exporting to ONNX it is 'native'.
        """
        fusable = self.rnn_layer == 'lstm' and self.num_layers == 1
        # the fused engine's autograd functions do not support torch.func transforms
        if not fusable or self.engine == 'native' or _functorch_active():
            return 'native'
        if self.engine == 'fused':
            return 'fused'
        if compiling is None:
            compiling = torch.compiler.is_compiling()
        if not compiling and (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            return 'native'  # exported graphs need the standard LSTM ops
        params = self._lstm_params()[1]
        ref = x if x is not None else params[0]
        grad = torch.is_grad_enabled() and (ref.requires_grad or any(
            p is not None and p.requires_grad for p in params))
        # under torch.compile the kernel is used if it was loaded before tracing (tracing does not build it)
        if compiling:
            from .cpu_kernel import loaded
            kernel = loaded()
        else:
            kernel = None
        from .fused_lstm import autocast_dtype
        autocast = autocast_dtype(ref.device.type) is not None
        triton = None
        if ref.device.type == 'cuda':
            from .fused_lstm import _triton_ok
            from .triton_lstm import supported
            triton = _triton_ok() and supported(self.hidden_size, autocast)
        # under autocast the engines cast the input to the autocast dtype: what matters is the weights' dtype
        dtype = params[0].dtype if autocast else ref.dtype
        return auto_engine(ref.device.type, grad, dtype, autocast, kernel, compiling=compiling, triton=triton)

    def _lstm_params(self):
        """((vertical, reverse) per direction, (w_ih, w_hh, b_ih, b_hh) per direction) for the fused engine.

        Directions come in the channel order of the native output (vertical before horizontal, forward
        before backward). The references are kept as a plain attribute, refreshed on every eager call,
        because torch.compile cannot trace through ``nn.LSTM`` modules themselves.
        """
        if not torch.compiler.is_compiling():
            kinds, params = [], []
            for rnn, vertical in ((self.rnn_v, True), (self.rnn_h, False)):
                if rnn is None:
                    continue
                for reverse in ((False, True) if rnn.bidirectional else (False,)):
                    sfx = '_l0_reverse' if reverse else '_l0'
                    kinds.append((vertical, reverse))
                    params += [getattr(rnn, 'weight_ih' + sfx), getattr(rnn, 'weight_hh' + sfx),
                               getattr(rnn, 'bias_ih' + sfx, None), getattr(rnn, 'bias_hh' + sfx, None)]
            self.__dict__['_lstm_refs'] = (tuple(kinds), tuple(params))
        return self._lstm_refs

    takes_residual = True   # forward(x, residual) is residual + forward(x)

    def casts_input(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` reads x only through its cast to the autocast dtype (the fused engine does, under
        autocast), so that a pre-norm may hand x over in that dtype."""
        return self.resolved_engine(x) == 'fused' and _unhooked(self)

    def residual_bias(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """fc's bias where a residual that already holds it can be accumulated onto in place
        (``forward(x, residual, bias_in_residual=True)``, see ``linear_residual``); else None."""
        return self.fc.bias if self.fc is not None and linear_into_ok(self.fc, x) else None

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                bias_in_residual: bool = False) -> torch.Tensor:
        """The mixed tokens, or ``residual + `` them when ``residual`` is given (see ``SequencerBlock``);
        ``bias_in_residual``: ``residual`` already holds fc's bias and is accumulated onto in place."""
        if self.resolved_engine(x) == 'fused':
            from .fused_lstm import fused_rnn2d
            y = fused_rnn2d(self, x)
        else:
            y = self._forward_native(x)
        if self.fc is not None:
            return linear_residual(self.fc, y, residual, bias_in_residual)
        if bias_in_residual:
            raise ValueError('RNN2D: bias_in_residual needs the fc layer')
        return y if residual is None else residual + y

    def _forward_native(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        v = h = None
        if self.rnn_v is not None:
            v, _ = self.rnn_v(x.permute(0, 2, 1, 3).reshape(B * W, H, C))
            v = v.reshape(B, W, H, -1).permute(0, 2, 1, 3)
        if self.rnn_h is not None:
            h, _ = self.rnn_h(x.reshape(B * H, W, C))
            h = h.reshape(B, H, W, -1)
        if v is None:
            return h
        if h is None:
            return v
        return torch.cat([v, h], dim=-1) if self.union == 'cat' else v + h


class RNN1D(nn.Module):
    """One (bi)directional RNN over the flattened token sequence (the vanilla Sequencer's mixer)."""

    def __init__(
            self,
            input_size: int,
            hidden_size: int,
            num_layers: int = 1,
            bias: bool = True,
            bidirectional: bool = True,
            rnn_layer: str = 'lstm',
    ):
        super().__init__()
        out = 2 * hidden_size if bidirectional else hidden_size
        if out != input_size:
            raise ValueError(
                f"the vanilla Sequencer needs the RNN output width to equal the channel width, but "
                f"hidden_size={hidden_size} (bidirectional={bidirectional}) gives {out} channels for "
                f"input width {input_size}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.rnn_layer = rnn_layer
        self.rnn = _rnn_class(rnn_layer)(input_size, hidden_size, num_layers, batch_first=True, bias=bias,
                                          bidirectional=bidirectional)

    takes_residual = True   # forward(x, residual) is residual + forward(x)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, H, W, C = x.shape
        y, _ = self.rnn(x.reshape(B, H * W, C))
        y = y.reshape(B, H, W, -1)
        return y if residual is None else residual + y


def auto_engine(device_type: str, grad: bool, dtype: torch.dtype, autocast: bool,
                cpu_kernel: Optional[bool] = None, compiling: bool = False, triton: Optional[bool] = None) -> str:
    """The engine 'auto' picks, from measurements of Sequencer2D-S against timm (BENCHMARKS.md).

    * CPU, float32, no autocast, with the compiled CPU recurrence (``cpu_kernel``; built on first use):
      'fused', for training and inference. On the 2-core Xeon of BENCHMARKS.md (batch 8, 224 px) the
      model runs 1.21x-1.27x timm's training step and 1.11x-1.21x its inference; with the native engine
      1.06x / 1.07x.
    * CPU training in float32 / float64 without the compiled kernel: 'fused' (its torch implementation,
      at parity with native, and it compiles whole). CPU inference without it: 'native' (oneDNN fuses
      each LSTM step; the torch implementation's element-wise ops per step cost more).
    * CPU under autocast (bfloat16), float32 weights: 'fused' with the compiled kernel (input projection
      in bfloat16, recurrence in float32): 1.18x / 1.14x timm against 1.15x / 1.09x with the native
      engine, whose oneDNN LSTM runs wholly in bfloat16 (one run each, BENCHMARKS.md); 'native' without
      the kernel.
    * CUDA, float32 weights under float16 / bfloat16 autocast, with the Triton kernels for the layer's
      hidden size: 'fused' for training and under torch.compile, 'native' (cuDNN) for eager inference.
      On an H200 (Sequencer2D-S, batch 256, bf16 autocast) the fused engine trained at 2.40x timm's eager
      step (3.59x compiled with CUDA graphs; the native engine 1.10x, in an earlier run), and compiled
      inference ran 2.36x timm's compiled model (whose LSTMs break the graph); eager inference ran 0.91x
      timm. Float32 on CUDA (not timed): 'native'.
    * Anything else (other devices, float16 / bfloat16 weights, CUDA without Triton): 'native'.

    ``cpu_kernel``: whether the compiled CPU kernel is usable (default: ask ``cpu_kernel.available()``,
    which builds it the first time). ``compiling``: whether torch.compile is tracing. ``triton``: whether
    the Triton kernels run this layer (default: whether Triton is available).
    """
    if device_type == 'cuda' and dtype == torch.float32:
        if not (autocast and (grad or compiling)):
            return 'native'
        if triton is None:
            from .fused_lstm import _triton_ok
            triton = _triton_ok()
        return 'fused' if triton else 'native'
    if device_type != 'cpu' or dtype not in (torch.float32, torch.float64):
        return 'native'
    if autocast and dtype != torch.float32:
        return 'native'
    if dtype == torch.float32:
        if cpu_kernel is None:
            from .cpu_kernel import available
            cpu_kernel = available()
        if cpu_kernel:
            return 'fused'
    return 'fused' if grad and not autocast else 'native'
