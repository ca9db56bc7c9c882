"""The rule by which the 'auto' engine picks how a BiLSTM2D's recurrences run, per call.

One table, read top to bottom; the first row whose conditions hold gives the engine. 'fused' is this package's
engine (``lstm2d``: the compiled CPU kernel, the Triton kernels on CUDA, or its torch implementation); 'native'
is ``nn.LSTM`` (oneDNN on CPU, cuDNN on CUDA). BENCHMARKS.md has the measurements behind each row.
"""
from typing import Optional

import torch

# (device, weights' dtype, under autocast, computing gradients or compiling, fast kernel available) -> engine;
# None matches anything. The kernel is the compiled CPU kernel on CPU and Triton on CUDA.
AUTO_RULES = (
    ('cuda', torch.float32, True, True, True, 'fused'),      # training / compiled under autocast: Triton kernels
    ('cuda', None, None, None, None, 'native'),              # eager inference, float32, no Triton: cuDNN
    ('cpu', torch.float32, None, None, True, 'fused'),       # the compiled CPU kernel, training and inference
    ('cpu', torch.float32, False, True, False, 'fused'),     # no kernel, training: the torch implementation
    ('cpu', torch.float64, False, True, None, 'fused'),      # float64 training (gradient checks)
    (None, None, None, None, None, 'native'),                # anything else: nn.LSTM
)


def auto_engine(device_type: str, dtype: torch.dtype, autocast: bool, grad_or_compiling: bool,
                kernel: Optional[bool]) -> str:
    """The engine 'auto' picks for a layer whose weights have ``dtype``, on ``device_type``, under autocast or not,
    computing gradients (or inside a torch.compile graph) or not, with the device's fast kernel available or
    not."""
    conditions = (device_type, dtype, autocast, grad_or_compiling, kernel)
    for *want, engine in AUTO_RULES:
        if all(w is None or w == c for w, c in zip(want, conditions)):
            return engine
    return 'native'
