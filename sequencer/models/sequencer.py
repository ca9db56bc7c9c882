"""Sequencer2D and the vanilla (1D) Sequencer.

Both are four stages of Sequencer blocks over an NHWC token grid: a patch-embedding stem, strided-conv
downsampling between stages, a final LayerNorm, mean pooling and a linear head. They differ only in the
token mixer: ``RNN2D`` (vertical + horizontal RNNs, the paper's BiLSTM2D) or ``RNN1D`` (one RNN over the
flattened tokens), plus the vanilla family's optional position embedding and patch shuffle.

Parameter names follow timm's port (``stages.N.blocks.M``, ``stages.N.downsample.down``, ``head.fc``) so
that timm checkpoints load as they are; ``sequencer.models.weights`` converts the reference layout.
"""
import math
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, PatchEmbed, lecun_normal_, register_notrace_function, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._manipulate import named_apply
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import RNN1D, RNN2D, Downsample2D, SequencerBlock, Shuffle, default_norm

__all__ = ['Sequencer2D', 'VanillaSequencer']


def _init_weights(module: nn.Module, name: str):
    """The reference initialisation: xavier Linear (zero head), lecun conv, uniform(+-1/sqrt(h)) RNN."""
    if isinstance(module, nn.Linear):
        if name.startswith('head'):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        else:
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                if 'mlp' in name:
                    nn.init.normal_(module.bias, std=1e-6)
                else:
                    nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        lecun_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.RNN, nn.GRU, nn.LSTM)):
        stdv = 1.0 / math.sqrt(module.hidden_size)
        for weight in module.parameters():
            nn.init.uniform_(weight, -stdv, stdv)


class SequencerStage(nn.Module):
    def __init__(self, dim_in: int, dim: int, depth: int, patch_size: int, mixer, mlp_ratio: float,
                 downsample: bool, drop: float, drop_paths: Sequence[float]):
        super().__init__()
        self.downsample = Downsample2D(dim_in, dim, patch_size) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            SequencerBlock(dim, mixer, mlp_ratio=mlp_ratio, drop=drop, drop_path=dp) for dp in drop_paths])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


def _check_lengths(**seqs):
    lengths = {k: len(v) for k, v in seqs.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"per-stage settings must have one entry per stage, got lengths {lengths}")


class _Sequencer(nn.Module):
    """Shared body of both families; subclasses choose the token mixer."""

    def __init__(
            self,
            mixer_for_stage,
            num_classes: int = 1000,
            in_chans: int = 3,
            layers: Sequence[int] = (4, 3, 8, 3),
            patch_sizes: Sequence[int] = (7, 2, 1, 1),
            embed_dims: Sequence[int] = (192, 384, 384, 384),
            hidden_sizes: Sequence[int] = (48, 96, 96, 96),
            mlp_ratios: Sequence[float] = (3.0, 3.0, 3.0, 3.0),
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            stem_norm: bool = False,
    ):
        super().__init__()
        _check_lengths(layers=layers, patch_sizes=patch_sizes, embed_dims=embed_dims, hidden_sizes=hidden_sizes,
                       mlp_ratios=mlp_ratios)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.embed_dims = tuple(embed_dims)
        self.patch_sizes = tuple(patch_sizes)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.output_fmt = 'NHWC'
        self.stem = PatchEmbed(img_size=None, patch_size=patch_sizes[0], in_chans=in_chans, embed_dim=embed_dims[0],
                               norm_layer=default_norm if stem_norm else None, flatten=False, output_fmt='NHWC')
        # stochastic depth grows linearly over all blocks: rate * i / (N - 1)
        total = sum(layers)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, self.feature_info = [], []
        reduction, start = 1, 0
        for i, depth in enumerate(layers):
            reduction *= patch_sizes[i]
            stages.append(SequencerStage(
                embed_dims[max(i - 1, 0)], embed_dims[i], depth, patch_sizes[i], mixer_for_stage(i, hidden_sizes[i]),
                mlp_ratios[i], downsample=i > 0, drop=proj_drop_rate, drop_paths=dpr[start:start + depth]))
            start += depth
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.norm = default_norm(embed_dims[-1])
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt='NHWC')
        named_apply(_init_weights, self)

    # ---- timm model API -------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r'^stem|^absolute_pos_embed',
            blocks=[(r'^stages\.(\d+)', None), (r'^norm', (99999,))] if coarse else [
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute every block in the backward pass instead of storing its activations."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """Replace the head with a freshly initialised one for ``num_classes`` (0 removes it)."""
        self.num_classes = num_classes
        ref = self.norm.weight
        self.head.reset(num_classes, pool_type=global_pool)
        self.head.to(device=ref.device, dtype=ref.dtype)
        if global_pool is not None:
            self.global_pool = global_pool
        if isinstance(self.head.fc, nn.Linear):
            nn.init.zeros_(self.head.fc.weight)
            nn.init.zeros_(self.head.fc.bias)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW by default) for ``indices`` (last n if int, all if None), timm's signature."""
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages if not stop_early or torch.jit.is_scripting() else self.stages[:max_index + 1]
        intermediates = []
        x = self._embed(x)
        idx = 0
        for idx, stage in enumerate(stages):
            x = stage(x)
            if idx in take_indices:
                y = self.norm(x) if norm and idx == last else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else y)
        if intermediates_only:
            return intermediates
        if idx == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages (and norm / head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.head = ClassifierHead(self.num_features, 0, pool_type='', input_fmt='NHWC')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC features after the final norm."""
        return self.norm(self.stages(self._embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class Sequencer2D(_Sequencer):
    """Sequencer2D: every block mixes tokens with ``RNN2D`` (BiLSTM2D for the default settings).

    Args follow the reference code: layers, patch_sizes, embed_dims, hidden_sizes, mlp_ratios (one per
    stage), bidirectional, union ('cat' | 'add' | 'vertical' | 'horizontal'), with_fc, rnn_layer
    ('lstm' | 'gru' | 'rnn'), num_rnn_layers, plus num_classes, in_chans, drop_rate, drop_path_rate.
    """

    def __init__(self, *, bidirectional: bool = True, union: str = 'cat', with_fc: bool = True,
                 rnn_layer: str = 'lstm', num_rnn_layers: int = 1, img_size: Optional[int] = None, **kwargs):
        def mixer(i, hidden):
            return partial(RNN2D, hidden_size=hidden, num_layers=num_rnn_layers, bidirectional=bidirectional,
                           union=union, with_fc=with_fc, rnn_layer=rnn_layer)

        super().__init__(mixer, **kwargs)
        self.union, self.with_fc, self.bidirectional, self.rnn_layer = union, with_fc, bidirectional, rnn_layer


class VanillaSequencer(_Sequencer):
    """The vanilla Sequencer: one (Bi)LSTM over the flattened tokens of each stage.

    Extra args: ``ape`` adds a learned absolute position embedding sized for ``img_size`` (resampled
    bicubically for other input sizes); ``shuffle`` permutes the tokens at random while training.
    """

    def __init__(self, *, bidirectional: bool = True, rnn_layer: str = 'lstm', num_rnn_layers: int = 1,
                 ape: bool = False, shuffle: bool = False, img_size: int = 224,
                 layers=(4, 3, 8, 3), patch_sizes=(14, 1, 1, 1), embed_dims=(384, 384, 384, 384),
                 hidden_sizes=(192, 192, 192, 192), **kwargs):
        def mixer(i, hidden):
            return partial(RNN1D, hidden_size=hidden, num_layers=num_rnn_layers,
                           bidirectional=bidirectional, rnn_layer=rnn_layer)

        super().__init__(mixer, layers=layers, patch_sizes=patch_sizes, embed_dims=embed_dims,
                         hidden_sizes=hidden_sizes, **kwargs)
        self.ape, self.img_size = ape, img_size
        self.shuffle_patches = Shuffle() if shuffle else None
        if ape:
            grid = img_size // patch_sizes[0]
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dims[0]))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        else:
            self.absolute_pos_embed = None

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.absolute_pos_embed is not None:
            x = x + resample_pos_embed(self.absolute_pos_embed, [x.shape[1], x.shape[2]])
        if self.shuffle_patches is not None:
            x = self.shuffle_patches(x)
        return x


@register_notrace_function
def resample_pos_embed(pos: torch.Tensor, size: List[int]) -> torch.Tensor:
    """Bicubically resize a (1, H, W, C) position embedding to ``size`` (identity when it already fits).
    A leaf function for FX tracing (its size check reads the input's shape)."""
    if pos.shape[1] == size[0] and pos.shape[2] == size[1]:
        return pos
    out = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(size[0], size[1]), mode='bicubic',
                        align_corners=False)
    return out.permute(0, 2, 3, 1).to(pos.dtype)


torch.fx.wrap('resample_pos_embed')
