"""Multiply-accumulate counts that include the recurrent work.

timm's published GMACs for Sequencer leave the LSTMs out (about 41% of the model). Here Linear and
Conv2d layers are counted from the shapes they see in one forward pass, and every recurrent token mixer
adds, per sequence step and direction, ``gates * hidden * (input + hidden)`` MACs (gates: LSTM 4, GRU 3,
tanh RNN 1). Norms, activations and element-wise gate arithmetic are not counted, as is customary.
"""
from typing import Dict, Sequence

import torch
from torch import nn

from ..models.blocks import RNN1D, RNN2D

_GATES = {'lstm': 4, 'gru': 3, 'rnn': 1}


def _rnn_macs(mixer, steps: int, sequences: int) -> int:
    dirs = 2 if mixer.bidirectional else 1
    total, inp = 0, mixer.input_size
    for _ in range(mixer.num_layers):
        total += _GATES[mixer.rnn_layer] * mixer.hidden_size * (inp + mixer.hidden_size) * dirs
        inp = mixer.hidden_size * dirs
    return total * steps * sequences


def count_flops_by_kind(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> Dict[str, int]:
    """MACs of one image, split into 'linear', 'conv' and 'rnn'."""
    counts = {'linear': 0, 'conv': 0, 'rnn': 0}

    def hook(module, inputs, output):
        x = inputs[0]
        if isinstance(module, nn.Linear):
            counts['linear'] += x.numel() // x.shape[-1] * module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            counts['conv'] += output.numel() * k
        elif isinstance(module, RNN2D):
            B, H, W, _ = x.shape
            if module.rnn_v is not None:
                counts['rnn'] += _rnn_macs(module, H, B * W)
            if module.rnn_h is not None:
                counts['rnn'] += _rnn_macs(module, W, B * H)
        elif isinstance(module, RNN1D):
            B, H, W, _ = x.shape
            counts['rnn'] += _rnn_macs(module, H * W, B)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d, RNN2D, RNN1D))]
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counts


def count_flops(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass of one image, recurrences included."""
    return sum(count_flops_by_kind(model, input_size).values())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
