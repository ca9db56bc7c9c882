"""Sequencer blocks and the layers around them. Tensors are NHWC."""
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from .fused_lstm import gpu_path
from .fused_mlp import Mlp, _tracing, _unhooked, norm_residual

default_norm = partial(nn.LayerNorm, eps=1e-6)


class SequencerBlock(nn.Module):
    """x + DropPath(mixer(LN(x))); x + DropPath(MLP(LN(x))). ``mixer`` builds the token mixer from the width.

    Where DropPath does nothing (in eval mode, or at a rate of 0), each residual add is handed to the branch's last
    linear layer (``forward(y, residual=x)``), which on CPU in float32 accumulates its GEMM onto
    ``x + bias`` instead of making a separate pass (``linear_residual``); ``x + bias`` is written by the
    pre-norm's kernel in the same pass over x, and when gradients are needed, those reaching x through the
    pre-norm and through the residual, and the bias's, are summed inside the norm's backward
    (``norm_residual``). This is skipped, and the plain sum computed, when the branch modules carry hooks
    (they must see the branch's own output) or do not declare ``takes_residual``; ``fuse_residual = False``
    turns it off.
    """

    fuse_residual: bool = True
    fused_norm: bool = True   # the pre-norms' Triton kernels on CUDA (``norm_residual``)

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

    def _residual_into_branches(self) -> bool:
        dp = self.drop_path
        inactive = type(dp) is nn.Identity or (type(dp) is DropPath and (not dp.training or dp.drop_prob == 0))
        return (self.fuse_residual and inactive
                and getattr(self.rnn_tokens, 'takes_residual', False)
                and getattr(self.mlp_channels, 'takes_residual', False)
                and _unhooked(self.rnn_tokens, self.mlp_channels, dp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._residual_into_branches():
            x = _residual_branch(self.norm1, self.rnn_tokens, x, self.fused_norm)
            return _residual_branch(self.norm2, self.mlp_channels, x, self.fused_norm)
        for norm, branch in ((self.norm1, self.rnn_tokens), (self.norm2, self.mlp_channels)):
            y, x = norm_residual(norm, x, lowp_out=_casts_input(branch, x, self.fused_norm),
                                 gpu_kernels=self.fused_norm, cpu_kernels=False)
            x = x + self.drop_path(branch(y))
        return x


def conv_as_gemm(conv: nn.Module, x: torch.Tensor, channels_first: bool = False) -> bool:
    """Whether ``patch_linear`` may stand in for ``conv`` on x (NHWC, or NCHW with ``channels_first``): a
    plain, hook-free ``nn.Conv2d`` whose kernel equals its stride (non-overlapping patches, no padding,
    dilation or groups), on CPU, with at least one whole patch, outside traced or exported graphs (the FLOP
    counter hooks convolutions: it still sees them)."""
    if _tracing() or type(conv) is not nn.Conv2d or x.device.type != 'cpu' or x.dim() != 4:
        return False
    H, W = x.shape[2:] if channels_first else x.shape[1:3]
    return (conv.kernel_size == conv.stride and conv.padding == (0, 0) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == 'zeros' and H >= conv.kernel_size[0]
            and W >= conv.kernel_size[1] and _unhooked(conv))


class _KernelLastWeight(torch.autograd.Function):
    """A conv weight (O, C, kh, kw) as the (O, kh * kw * C) matrix of NHWC patches; its gradient comes back
    contiguous in the weight's own layout (autograd's permute would hand DDP's buckets a permuted one)."""

    @staticmethod
    def forward(ctx, weight):
        ctx.shape = weight.shape
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)

    @staticmethod
    def backward(ctx, g):
        O, C, kh, kw = ctx.shape
        return g.reshape(O, kh, kw, C).permute(0, 3, 1, 2).contiguous()


def patch_linear(x: torch.Tensor, conv: nn.Conv2d, channels_first: bool = False) -> torch.Tensor:
    """``conv`` (see ``conv_as_gemm``) as one GEMM over the patches, NHWC out; x is NHWC, or NCHW with
    ``channels_first``. The same sum as the convolution (rows and columns past the last whole patch are
    dropped, as the convolution does); the patches are a view for 1x1 kernels on NHWC input, one gathering
    copy otherwise, laid out (kh, kw, c) for NHWC input (whole channel rows) and (c, kh, kw) for NCHW (the
    weight's own order). The weight's gradient has the weight's strides, as DDP's gradient buckets expect."""
    ph, pw = conv.kernel_size
    if channels_first:
        B, C, H, W = x.shape
        Ho, Wo = H // ph, W // pw
        patches = x[:, :, :Ho * ph, :Wo * pw].reshape(B, C, Ho, ph, Wo, pw).permute(0, 2, 4, 1, 3, 5)
        weight = conv.weight.reshape(conv.out_channels, C * ph * pw)
    else:
        B, H, W, C = x.shape
        Ho, Wo = H // ph, W // pw
        patches = x[:, :Ho * ph, :Wo * pw].reshape(B, Ho, ph, Wo, pw, C).transpose(2, 3)
        weight = (conv.weight.reshape(conv.out_channels, C) if ph == pw == 1
                  else _KernelLastWeight.apply(conv.weight))
    return F.linear(patches.reshape(B, Ho, Wo, C * ph * pw), weight, conv.bias)


def _casts_input(branch: nn.Module, x: torch.Tensor, gpu_kernels: bool) -> bool:
    """Whether the pre-norm may hand x over to the branch in the autocast dtype: on the GPU path (where the
    pre-norm's kernels run), for a branch that reads its input only through that cast (``casts_input``)."""
    if not (gpu_kernels and gpu_path(x)):
        return False
    casts = getattr(branch, 'casts_input', None)
    return casts is not None and casts(x)


def _residual_branch(norm: nn.Module, branch: nn.Module, x: torch.Tensor, gpu_kernels: bool = True) -> torch.Tensor:
    """x + branch(norm(x)) with the residual handed to the branch. Where the branch can accumulate onto a
    residual that already holds its last linear layer's bias (``branch.residual_bias``), the norm writes
    x + bias in its own pass over x (``norm_residual``) and the branch's GEMM adds onto that in place."""
    get_bias = getattr(branch, 'residual_bias', None)
    bias = get_bias(x) if get_bias is not None and x.is_contiguous() else None
    y, r = norm_residual(norm, x, bias, lowp_out=bias is None and _casts_input(branch, x, gpu_kernels),
                         gpu_kernels=gpu_kernels)
    if bias is None:
        return branch(y, residual=r)
    return branch(y, residual=r, bias_in_residual=True)


class Downsample2D(nn.Module):
    """Strided convolution between stages, NHWC in and out.

    The convolution's kernel equals its stride (non-overlapping patches), so on CPU it runs as one GEMM over
    the patches (``patch_linear``): the same sum as the convolution, 2 ms faster (forward + backward) for a
    1x1 one of Sequencer2D-S at batch 8. A hooked or replaced ``down`` (the FLOP counter hooks
    convolutions) and traced or exported graphs get the convolution itself.
    """

    def __init__(self, input_dim: int, output_dim: int, patch_size: int):
        super().__init__()
        self.down = nn.Conv2d(input_dim, output_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if conv_as_gemm(self.down, x):
            return patch_linear(x, self.down)
        # NHWC in = channels-last NCHW for the convolution, whose channels-last output is NHWC again
        return self.down(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()


class Shuffle(nn.Module):
    """Randomly permutes the tokens of every image during training (the vanilla Sequencer's ablation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        B, H, W, C = x.shape
        perm = torch.randperm(H * W, device=x.device)
        return x.reshape(B, H * W, C)[:, perm].reshape(B, H, W, C)
