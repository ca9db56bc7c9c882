"""The fast engine: the same network as ``sequencer.models``, faster, with the same parameters.

Design: module swapping, applied in one place. A model is always built plain (``sequencer.models``: the paper's
network in plain PyTorch, FX-traceable, scriptable, exportable). ``set_engine(model, 'auto' | 'fused')`` then
replaces the plain layers by fast subclasses (``modules.FAST``: BiLSTM2D, the block, the MLP, the stem and the
downsampling layers), in place, by switching each module's class; ``set_engine(model, 'native')`` switches them
back. Parameters, buffers and state_dict keys never change, so checkpoints do not depend on the engine, and
the plain modules know nothing of this package.

Why swapping rather than a registry of functions called from the plain forward (as Hugging Face transformers
does for attention): the fusions here cross module boundaries (a block's residual add goes into its branch's
last GEMM, the pre-norm writes the residual with the bias already added), so the unit of replacement is the
module, and a registry would need hooks for these in the plain model. A swapped module is also visible:
``print(model)`` shows ``FastRNN2D(..., engine='auto')``.

'auto' picks per call. On CPU, in eager mode, the first call of each layer shape times both recurrences (the
fused one and ``nn.LSTM``'s oneDNN kernel) and keeps the faster, cached on disk per processor (``autotune``:
``sequencer autotune`` shows the cache, ``--clear`` empties it, ``SEQUENCER_AUTOTUNE=0`` turns measuring off).
Elsewhere, and when measuring is off, one table decides (``rules.AUTO_RULES``). ``set_engine(model, 'fused')`` or
``'native'`` forces a choice. The fast modules are leaves for FX feature extraction
(``timm.layers.register_notrace_module``); TorchScript turns them back into the plain ones; ONNX export and other
traced graphs run their plain forward.

Kernels: ``cpu_kernel`` (C++ with OpenMP, ``csrc/``, built on first use), ``triton_lstm`` / ``triton_norm``
(CUDA, optional dependency triton), ``lstm2d`` (the fused BiLSTM2D and its torch implementation), ``ops`` (the
fused MLP, residual and pre-norm operations). ``runtime`` holds the process-wide switches
(``cpu_kernel_disabled()``, ``triton_on_cpu()``).
"""
from .modules import (
                      ENGINES,
                      FAST,
                      PLAIN,
                      FastDownsample2D,
                      FastMlp,
                      FastModule,
                      FastPatchEmbed,
                      FastRNN2D,
                      FastSequencerBlock,
                      engine_of,
                      set_engine,
                      to_plain,
)
from .rules import AUTO_RULES, auto_engine
from .runtime import cpu_kernel_disabled, triton_on_cpu

__all__ = ['ENGINES', 'FAST', 'PLAIN', 'FastDownsample2D', 'FastMlp', 'FastModule', 'FastPatchEmbed', 'FastRNN2D',
           'FastSequencerBlock', 'engine_of', 'set_engine', 'to_plain', 'AUTO_RULES', 'auto_engine',
           'cpu_kernel_disabled', 'triton_on_cpu']
