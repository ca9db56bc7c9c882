"""Block-level fusions: residual adds handed to the branches' last linear layers
(``FastSequencerBlock.fused_residual``), the pre-norm backward with the residual gradient, and the strided
convolutions (downsampling, stem) as GEMMs."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from torch import nn

from sequencer.fast import FastDownsample2D, FastMlp, FastPatchEmbed, FastSequencerBlock, cpu_kernel, set_engine
from sequencer.fast.ops import conv_as_gemm, linear_residual, norm_residual, patch_linear
from sequencer.models import Sequencer2D
from sequencer.models.blocks import RNN1D, RNN2D, Downsample2D, SequencerBlock


def _need_kernel():
    """Skip where the compiled CPU kernel is disabled; elsewhere it must load."""
    if not cpu_kernel.enabled():
        pytest.skip(f'{cpu_kernel.ENV}=0')
    assert cpu_kernel.load(raise_errors=True), cpu_kernel.error()


def _block(drop_path=0.0, mixer=None, engine='fused'):
    """A fast block (its BiLSTM2D on ``engine``: 'fused' by default, so that no measured choice intervenes)."""
    torch.manual_seed(0)
    mixer = mixer or partial(RNN2D, hidden_size=12)
    block = set_engine(SequencerBlock(24, mixer, mlp_ratio=3.0, drop_path=drop_path), engine)
    assert type(block) is FastSequencerBlock and type(block.mlp_channels) is FastMlp
    return block


def _run(block, x, g, fuse):
    block.fused_residual = fuse
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = block(x)
    y.backward(g)
    return y.detach(), x.grad, [p.grad.clone() for p in block.parameters()]


@pytest.mark.parametrize('mixer, into_branches', [(partial(RNN2D, hidden_size=12), True),
                                                   (partial(RNN1D, hidden_size=12), False)],
                         ids=['RNN2D', 'RNN1D'])
def test_fused_residual_matches_the_plain_sum(mixer, into_branches):
    """With the BiLSTM2D the residual goes into both branches; the vanilla mixer (RNN1D, no fast class) takes no
    residual, so the block adds it plainly; the same result either way."""
    block = _block(mixer=mixer).train()
    x = torch.randn(3, 5, 7, 24)
    g = torch.randn(3, 5, 7, 24)
    assert block._residual_into_branches() == into_branches
    (ya, gxa, gpa), (yb, gxb, gpb) = _run(block, x, g, False), _run(block, x, g, True)
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gxb, gxa, atol=1e-5, rtol=1e-5)
    for a, b in zip(gpa, gpb):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    block.eval()
    with torch.no_grad():
        block.fused_residual = True
        fused = block(x)
        block.fused_residual = False
        torch.testing.assert_close(fused, block(x), atol=1e-5, rtol=1e-5)


def test_the_fused_paths_run(monkeypatch):
    """The residual reaches the branches: the pre-norms write x + bias of the branch's last linear layer, the
    mixer's fc and the MLP's fc2 accumulate onto it in place with addmm_, and when training the pre-norms'
    backward is the fused one (which also gives the biases' gradients: no separate add or sum)."""
    _need_kernel()
    block = _block().train()
    x = torch.randn(2, 4, 4, 24, requires_grad=True)
    seen = {'addmm_': 0}
    real_mlp_into, real_addmm_ = FastMlp.forward_into, torch.Tensor.addmm_

    def spy(self, y, residual):   # the block hands the residual, holding fc2's bias, to the MLP's fused path
        seen['mlp_into'] = residual is not None
        return real_mlp_into(self, y, residual)

    def addmm_spy(self, *args, **kwargs):
        seen['addmm_'] += 1
        return real_addmm_(self, *args, **kwargs)

    monkeypatch.setattr(FastMlp, 'forward_into', spy)
    monkeypatch.setattr(torch.Tensor, 'addmm_', addmm_spy)
    out = block(x)
    assert seen.get('mlp_into') and seen['addmm_'] >= 2

    names = []

    def walk(fn):
        if fn is not None and len(names) < 200:
            names.append(type(fn).__name__)
            for f, _ in fn.next_functions:
                walk(f)

    walk(out.grad_fn)
    assert {'_NormResidualBackward', '_LinearResidualBackward', '_FusedMlpBackward'} <= set(names)
    assert 'AddBackward0' not in names and 'SumBackward1' not in names
    with torch.no_grad():
        x1 = x + block.rnn_tokens(block.norm1(x))
        torch.testing.assert_close(out, x1 + block.mlp_channels(block.norm2(x1)), atol=1e-5, rtol=1e-5)


def test_linear_residual_paths():
    torch.manual_seed(0)
    fc = nn.Linear(6, 5)
    x, r = torch.randn(2, 3, 6), torch.randn(2, 3, 5)
    want = r + fc(x)
    out = linear_residual(fc, x, r)
    assert type(out.grad_fn).__name__ != 'AddBackward0'        # the GEMM accumulated onto r + bias
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(linear_residual(fc, x, None), fc(x))
    handle = fc.register_forward_hook(lambda m, i, o: None)    # a hook: the module itself must run
    assert type(linear_residual(fc, x, r).grad_fn).__name__ == 'AddBackward0'
    handle.remove()
    with torch.autocast('cpu', dtype=torch.bfloat16):         # autocast: the plain sum, under autocast
        out = linear_residual(fc, x, r)
    assert type(out.grad_fn).__name__ == 'AddBackward0'


def test_hooks_on_a_branch_see_the_branch_output():
    """A hook on the mixer or the MLP (feature extraction, analysis) gets the branch's own output."""
    block = _block().eval()
    x = torch.randn(2, 4, 4, 24)
    got = {}
    handle = block.rnn_tokens.register_forward_hook(lambda m, i, o: got.setdefault('mixer', o))
    with torch.no_grad():
        out = block(x)
        handle.remove()
        torch.testing.assert_close(got['mixer'], block.rnn_tokens(block.norm1(x)))
        block.fused_residual = False
        torch.testing.assert_close(out, block(x), atol=1e-5, rtol=1e-5)


def test_active_drop_path_keeps_the_plain_sum():
    block = _block(drop_path=0.5).train()
    assert not block._residual_into_branches()
    block.eval()                                             # DropPath does nothing in eval
    assert block._residual_into_branches()


def test_a_mixer_without_residual_support_is_called_plainly():
    class Plain(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.fc = nn.Linear(dim, dim)

        def forward(self, x):                                   # no residual argument
            return self.fc(x)

    block = _block(mixer=Plain).eval()
    assert type(block.rnn_tokens) is Plain and not block._residual_into_branches()
    x = torch.randn(2, 3, 3, 24)
    with torch.no_grad():
        x1 = x + block.rnn_tokens(block.norm1(x))
        torch.testing.assert_close(block(x), x1 + block.mlp_channels(block.norm2(x1)))


@pytest.mark.parametrize('rows,width', [(37, 40), (64, 384), (5, 7)])
def test_norm_backward_kernel_matches_layer_norm_backward_plus_residual(rows, width):
    """Widths with and without a remainder of the kernel's 16 lanes."""
    _need_kernel()
    torch.manual_seed(0)
    x = torch.randn(rows, width) * 2 + 0.5
    w, b = torch.randn(width), torch.randn(width)
    g, g_res = torch.randn(rows, width), torch.randn(rows, width)
    _, mean, rstd = torch.native_layer_norm(x, (width,), w, b, 1e-6)
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(g, x, (width,), mean, rstd, w, b, [True, True, True])
    got = torch.ops.sequencer_norm.layer_norm_backward_residual(g, x, mean, rstd, w, g_res)
    for want, have in zip((dx + g_res, dw, db), got[:3]):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)
    assert got[3].numel() == 0
    got = torch.ops.sequencer_norm.layer_norm_backward_residual(g, x, mean, rstd, w, g_res, True)
    for want, have in zip((dx + g_res, dw, db, g_res.sum(0)), got):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('shape', [(37, 40), (2, 8, 384), (5, 7), (3, 4, 5, 20)])
def test_norm_forward_kernel_matches_layer_norm_and_adds_the_bias(shape):
    """LN(x) and x + r_bias in one pass: the same output, mean and rstd as native_layer_norm."""
    _need_kernel()
    torch.manual_seed(0)
    width = shape[-1]
    x = torch.randn(*shape) * 3 + 1.5
    w, b, rb = torch.randn(width), torch.randn(width), torch.randn(width)
    want = torch.native_layer_norm(x, (width,), w, b, 1e-6)
    y, mean, rstd, r = torch.ops.sequencer_norm.layer_norm_residual_bias(x, w, b, 1e-6, rb)
    for have, ref in zip((y, mean, rstd), want):
        assert have.shape == ref.shape
        torch.testing.assert_close(have, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r, x + rb, atol=0, rtol=0)


@pytest.mark.parametrize('grad', [True, False])
def test_norm_residual_with_the_branch_bias(grad):
    """norm_residual(norm, x, bias) = (norm(x), x + bias), a fresh tensor, with the gradients of x, the norm's
    parameters and the bias; without gradients the kernel's forward alone; a hooked norm runs itself."""
    _need_kernel()
    torch.manual_seed(0)
    norm = nn.LayerNorm(20, eps=1e-6)
    nn.init.normal_(norm.weight)
    bias = nn.Parameter(torch.randn(20))
    x = torch.randn(2, 3, 4, 20, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        y, r = norm_residual(norm, x, bias)
        want_y, want_r = norm(x), x + bias
    assert r is not x
    torch.testing.assert_close(y, want_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r, want_r)
    if grad:
        assert type(y.grad_fn).__name__ == '_NormResidualBackward'
        g, g_res = torch.randn_like(y), torch.randn_like(y)
        params = [x, norm.weight, norm.bias, bias]
        have = torch.autograd.grad([y, r], params, [g, g_res])
        want = torch.autograd.grad([want_y, want_r], params, [g, g_res])
        for a, b in zip(have, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    handle = norm.register_forward_hook(lambda m, i, o: None)
    with torch.set_grad_enabled(grad):
        y, r = norm_residual(norm, x, bias)
    torch.testing.assert_close(r, want_r)
    assert y.grad_fn is None or type(y.grad_fn).__name__ == 'NativeLayerNormBackward0'
    handle.remove()


def test_branches_accumulate_onto_a_residual_holding_their_bias():
    """forward(y, residual=x + bias, bias_in_residual=True) = x + branch(y), accumulated in place, with the
    same gradients; refused where the branch would not take its fused path."""
    _need_kernel()
    torch.manual_seed(0)
    mixer, mlp = set_engine(RNN2D(24, 12), 'fused'), set_engine(Mlp(24, 72), 'fused')
    x = torch.randn(2, 3, 4, 24, requires_grad=True)
    y = torch.randn(2, 3, 4, 24, requires_grad=True)
    for branch in (mixer, mlp):
        bias = branch.residual_bias(y)
        assert bias is not None
        r = x + bias
        out = branch(y, residual=r, bias_in_residual=True)
        assert out.data_ptr() == r.data_ptr()                 # in place
        want = x + branch(y)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        params = [x, y] + list(branch.parameters())
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    handle = mlp.fc2.register_forward_hook(lambda m, i, o: None)
    assert mlp.residual_bias(y) is None
    with pytest.raises(ValueError, match='bias_in_residual'):
        mlp(y, residual=x.detach() + 1, bias_in_residual=True)
    handle.remove()
    assert set_engine(RNN2D(24, 12, with_fc=False, union='add'), 'fused').residual_bias(y) is None
    gru = set_engine(RNN2D(24, 12, rnn_layer='gru'), 'fused')      # nor where the recurrence is nn.GRU
    assert gru.residual_bias(y) is None
    with pytest.raises(ValueError, match='bias_in_residual'):
        gru(y, residual=x.detach() + 1, bias_in_residual=True)


def test_norm_residual_runs_when_gradients_are_needed():
    _need_kernel()
    torch.manual_seed(0)
    norm = nn.LayerNorm(24, eps=1e-6)
    x = torch.randn(2, 3, 4, 24, requires_grad=True)
    y, r = norm_residual(norm, x)
    assert type(y.grad_fn).__name__ == '_NormResidualBackward'
    g, g_res = torch.randn_like(y), torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad([y, r], [x, norm.weight, norm.bias], [g, g_res])
    wx, ww, wb = torch.autograd.grad([norm(x), x], [x, norm.weight, norm.bias], [g, g_res])
    for have, want in ((gx, wx), (gw, ww), (gb, wb)):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():                                     # no bias, no gradients: nothing to fuse
        y, r = norm_residual(norm, x)
        assert r is x
    handle = norm.register_forward_hook(lambda m, i, o: None)
    y, r = norm_residual(norm, x)
    assert r is x and type(y.grad_fn).__name__ == 'NativeLayerNormBackward0'
    handle.remove()


@pytest.mark.parametrize('with_bias', [False, True])
def test_norm_residual_double_backward(with_bias):
    """create_graph (a gradient penalty): the backward is LayerNorm's own, itself differentiable."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(24, eps=1e-6)
    x = torch.randn(2, 3, 24, requires_grad=True)
    bias = nn.Parameter(torch.randn(24)) if with_bias else None
    params = [x, norm.weight, norm.bias] + ([bias] if with_bias else [])

    def penalty(fused):
        if fused:
            y, r = norm_residual(norm, x, bias)
        else:
            y, r = norm(x), (x if bias is None else x + bias)
        grads = torch.autograd.grad((y.sin() * r).sum(), params, create_graph=True)
        return torch.autograd.grad(sum(gr.square().sum() for gr in grads), params)

    for have, want in zip(penalty(True), penalty(False)):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)


def test_a_non_contiguous_block_input():
    """A permuted (non-contiguous) input takes the plain residual path, with the same result."""
    block = _block().train()
    base = torch.randn(2, 24, 4, 5, requires_grad=True)
    x = base.permute(0, 2, 3, 1)
    assert not x.is_contiguous()
    g = torch.randn(2, 4, 5, 24)
    got = block(x)
    grads = torch.autograd.grad(got, [base] + list(block.parameters()), g)
    block.fused_residual = False
    want = block(x)
    want_grads = torch.autograd.grad(want, [base] + list(block.parameters()), g)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('frozen', ['input', 'norms', 'all_but_norms'])
def test_partly_frozen_blocks_get_the_same_gradients(frozen):
    """An input without gradient (the first block of a frozen stem), frozen norms, or only norms trainable."""
    block = _block().train()
    for name, p in block.named_parameters():
        is_norm = name.startswith('norm')
        p.requires_grad_((frozen == 'norms' and not is_norm) or (frozen == 'all_but_norms' and is_norm)
                         or frozen == 'input')
    x = torch.randn(2, 4, 5, 24, requires_grad=frozen != 'input')
    g = torch.randn(2, 4, 5, 24)
    params = [p for p in block.parameters() if p.requires_grad] + ([x] if x.requires_grad else [])
    got, want = [], []
    for fuse, out in ((True, got), (False, want)):
        block.fused_residual = fuse
        out.extend(torch.autograd.grad(block(x), params, g))
    for have, ref in zip(got, want):
        torch.testing.assert_close(have, ref, atol=1e-5, rtol=1e-5)


def test_a_residual_of_another_shape_is_added_plainly():
    torch.manual_seed(0)
    fc = nn.Linear(6, 5)
    x, r = torch.randn(2, 3, 6), torch.randn(5)                 # broadcast
    torch.testing.assert_close(linear_residual(fc, x, r), r + fc(x))
    mlp = set_engine(Mlp(6, 12, out_features=5), 'auto')
    torch.testing.assert_close(mlp(x, residual=r), r + mlp(x))


def _conv_reference(conv, x, channels_first):
    """The convolution itself, NHWC out."""
    inp = x if channels_first else x.permute(0, 3, 1, 2)
    return F.conv2d(inp, conv.weight, conv.bias, stride=conv.stride).permute(0, 2, 3, 1)


@pytest.mark.parametrize('patch, size, channels_first', [(2, (9, 8), False), (1, (5, 3), False),
                                                         (7, (23, 30), True), (4, (16, 13), True)])
def test_strided_convolution_as_one_gemm(patch, size, channels_first, monkeypatch):
    """``patch_linear`` (downsampling between stages, NHWC in; the stem, NCHW in) gives the convolution's output
    and gradients, dropping the rows and columns past the last whole patch as the convolution does, and the
    convolution itself is not called."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, kernel_size=patch, stride=patch)
    shape = (2, 6, *size) if channels_first else (2, *size, 6)
    x = torch.randn(*shape, requires_grad=True)
    assert conv_as_gemm(conv, x, channels_first=channels_first)
    calls = []
    monkeypatch.setattr(nn.Conv2d, 'forward', lambda self, inp: calls.append(1) or F.conv2d(inp, self.weight))
    y = patch_linear(x, conv, channels_first=channels_first)
    assert not calls and y.is_contiguous()
    ref = _conv_reference(conv, x, channels_first)
    assert y.shape == ref.shape
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, (x, conv.weight, conv.bias), g)
    ref_grads = torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_hooked_or_padded_convolutions_are_not_replaced():
    conv = nn.Conv2d(4, 8, kernel_size=2, stride=2)
    x = torch.randn(1, 6, 6, 4)
    assert conv_as_gemm(conv, x)
    assert not conv_as_gemm(nn.Conv2d(4, 8, kernel_size=3, stride=2), x)
    assert not conv_as_gemm(nn.Conv2d(4, 8, kernel_size=2, stride=2, padding=1), x)
    assert not conv_as_gemm(nn.Conv2d(4, 8, kernel_size=7, stride=7), x)              # no whole patch: 6 < 7
    assert not conv_as_gemm(conv, torch.randn(1, 4, 6, 1), channels_first=True)      # NCHW, width 1 < 2
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert not conv_as_gemm(conv, x)
    down = set_engine(Downsample2D(4, 8, 2), 'auto')
    assert type(down) is FastDownsample2D and conv_as_gemm(down.down, x)
    down.down = conv
    assert down(x).shape == (1, 3, 3, 8) and seen == [(1, 8, 3, 3)]   # the hook saw the convolution run


def test_the_stem_runs_as_a_gemm_and_matches_patch_embed():
    """Sequencer2D's stem (FastPatchEmbed): the GEMM path (NHWC straight out) against timm's PatchEmbed (the
    convolution, then a copy to NHWC), output and gradients; with a hook on the stem, PatchEmbed's own forward."""
    torch.manual_seed(0)
    m = set_engine(Sequencer2D(layers=(1, 1), patch_sizes=(7, 2), embed_dims=(16, 32), hidden_sizes=(4, 8),
                               mlp_ratios=(3, 3), num_classes=5), 'auto')
    assert type(m.stem) is FastPatchEmbed
    x = torch.randn(2, 3, 30, 23, requires_grad=True)
    ref = PatchEmbed.forward(m.stem, x).contiguous()
    conv_forward = nn.Conv2d.forward
    try:
        nn.Conv2d.forward = lambda self, inp: pytest.fail('the stem ran its convolution')
        y = m.stem(x)
    finally:
        nn.Conv2d.forward = conv_forward
    assert y.is_contiguous() and y.shape == ref.shape == (2, 4, 3, 16)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    wrt = (x, m.stem.proj.weight, m.stem.proj.bias)
    for a, b in zip(torch.autograd.grad(y, wrt, g), torch.autograd.grad(ref, wrt, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    seen = []
    m.stem.proj.register_forward_hook(lambda mod, i, o: seen.append(1))   # a hook on the convolution itself
    torch.testing.assert_close(m.stem(x), ref, rtol=1e-5, atol=1e-5)
    assert seen == [1]


@pytest.mark.parametrize('patch, channels_first', [(1, False), (2, False), (7, True)])
def test_patch_gemm_weight_gradient_has_the_weight_layout(patch, channels_first):
    """DDP's gradient buckets expect each gradient in its parameter's strides (else a warning and copies)."""
    conv = nn.Conv2d(6, 10, kernel_size=patch, stride=patch)
    x = torch.randn(2, 6, 14, 14) if channels_first else torch.randn(2, 14, 14, 6)
    patch_linear(x, conv, channels_first=channels_first).sum().backward()
    assert conv.weight.grad.stride() == conv.weight.stride()
    ref = torch.autograd.grad(_conv_reference(conv, x, channels_first).sum(), conv.weight)[0]
    torch.testing.assert_close(conv.weight.grad, ref, rtol=1e-5, atol=1e-5)
