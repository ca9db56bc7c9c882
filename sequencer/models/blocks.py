"""The layers of the paper's networks, in plain PyTorch. Tensors inside blocks are NHWC.

``RNN2D`` is the paper's BiLSTM2D: a vertical RNN down every column and a horizontal RNN along every row,
united (``union``: 'cat', 'add', 'vertical' or 'horizontal') and, ``with_fc``, fused back to the channel
width by a Linear layer. ``RNN1D`` is the vanilla Sequencer's mixer: one RNN over the flattened tokens.
The recurrent weights live in ordinary ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` modules, so the reference
code's and timm's checkpoints load unchanged. The fast engine (``sequencer.fast``) replaces these modules
by subclasses with the same parameters; nothing here knows about it.
"""
from functools import partial
from typing import Callable, List

import torch
from timm.layers import DropPath, Mlp
from torch import nn

__all__ = ['RNN2D', 'RNN1D', 'SequencerBlock', 'Downsample2D', 'Shuffle', 'Mlp', 'default_norm', 'RNN_CLASSES',
           'UNIONS']

RNN_CLASSES = {'lstm': nn.LSTM, 'gru': nn.GRU, 'rnn': nn.RNN}
UNIONS = ('cat', 'add', 'vertical', 'horizontal')

default_norm = partial(nn.LayerNorm, eps=1e-6)


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
        union_size = 2 * self.output_size if union == 'cat' else self.output_size
        if not with_fc and union_size != input_size:
            raise ValueError(
                f"with_fc=False needs the RNN output width to equal the channel width, but union={union!r} "
                f"with hidden_size={hidden_size} (bidirectional={bidirectional}) gives {union_size} "
                f"channels for input width {input_size}")
        cls = _rnn_class(rnn_layer)

        def rnn():
            return cls(input_size, hidden_size, num_layers, batch_first=True, bias=bias, bidirectional=bidirectional)

        self.rnn_v = rnn() if union != 'horizontal' else None
        self.rnn_h = rnn() if union != 'vertical' else None
        self.fc = nn.Linear(union_size, input_size) if with_fc else None

    def extra_repr(self) -> str:
        return f"union={self.union!r}, with_fc={self.with_fc}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        outs: List[torch.Tensor] = []
        if self.rnn_v is not None:   # down every column
            v, _ = self.rnn_v(x.permute(0, 2, 1, 3).reshape(B * W, H, C))
            outs.append(v.reshape(B, W, H, v.shape[-1]).permute(0, 2, 1, 3))   # (not -1: B may be 0)
        if self.rnn_h is not None:   # along every row
            h, _ = self.rnn_h(x.reshape(B * H, W, C))
            outs.append(h.reshape(B, H, W, h.shape[-1]))
        if self.union == 'cat':
            x = torch.cat(outs, dim=-1)
        elif self.union == 'add':
            x = outs[0] + outs[1]
        else:
            x = outs[0]
        if self.fc is not None:
            x = self.fc(x)
        return x


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        y, _ = self.rnn(x.reshape(B, H * W, C))
        return y.reshape(B, H, W, y.shape[-1])


class SequencerBlock(nn.Module):
    """x + DropPath(mixer(LN(x))), then x + DropPath(MLP(LN(x))). ``mixer`` builds the token mixer from the width."""

    def __init__(
            self,
            dim: int,
            mixer: Callable[[int], nn.Module],
            mlp_ratio: float = 3.0,
            norm_layer: Callable[[int], nn.Module] = default_norm,
            act_layer: Callable[..., nn.Module] = nn.GELU,
            drop: float = 0.,
            drop_path: float = 0.,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.rnn_tokens = mixer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp_channels = Mlp(dim, int(mlp_ratio * dim), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.rnn_tokens(self.norm1(x)))
        x = x + self.drop_path(self.mlp_channels(self.norm2(x)))
        return x


class Downsample2D(nn.Module):
    """Strided convolution between stages (kernel = stride: non-overlapping patches), NHWC in and out."""

    def __init__(self, input_dim: int, output_dim: int, patch_size: int):
        super().__init__()
        self.down = nn.Conv2d(input_dim, output_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Shuffle(nn.Module):
    """Randomly permutes the tokens of every image during training (the vanilla Sequencer's ablation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            B, H, W, C = x.shape
            perm = torch.randperm(H * W, device=x.device)
            x = x.reshape(B, H * W, C)[:, perm].reshape(B, H, W, C)
        return x
