"""The fused channel MLP (CPU, float32) against timm's Mlp: outputs, every gradient, the kernel's GELU, fallbacks."""
import pytest
import torch
from timm.layers import Mlp as TimmMlp
from torch import nn

from sequencer.fast import FastMlp, cpu_kernel, cpu_kernel_disabled, set_engine


@pytest.fixture(autouse=True)
def kernel():
    if not cpu_kernel.enabled():
        pytest.skip(f'{cpu_kernel.ENV}=0')
    assert cpu_kernel.load(raise_errors=True), cpu_kernel.error()  # a C++ compiler is part of the dev setup


def _pair(c_in, hidden, **kw):
    torch.manual_seed(0)
    ref = TimmMlp(c_in, hidden, **kw)
    ours = TimmMlp(c_in, hidden, **kw)
    ours.load_state_dict(ref.state_dict())
    set_engine(ours, 'auto')
    assert type(ours) is FastMlp and ours.fused
    return ref, ours


def _run(module, x, g):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad, [p.grad for p in module.parameters()]


@pytest.mark.parametrize('shape,hidden', [((3, 5, 7, 64), 192), ((2, 4, 4, 37), 111), ((1, 1, 1, 16), 48)])
def test_fused_mlp_matches_timm(shape, hidden):
    """Odd widths (vector remainders), a single token (fewer rows than threads), large inputs (GELU tails)."""
    ref, ours = _pair(shape[-1], hidden)
    x = torch.randn(shape) * 3
    assert ours.fusable(x)
    y = ours(x.requires_grad_(True))
    assert type(y.grad_fn).__name__.startswith('_FusedMlp')    # the fused path ran
    g = torch.randn(y.shape)
    (ya, gxa, gpa), (yb, gxb, gpb) = _run(ref, x.detach(), g), _run(ours, x.detach(), g)
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gxb, gxa, atol=1e-5, rtol=1e-5)
    for a, b in zip(gpa, gpb):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    with torch.no_grad():                                       # inference: no derivative is written
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_kernel_gelu_and_derivative_match_torch():
    v = torch.linspace(-12, 12, 24001).view(-1, 1).repeat(1, 3).contiguous()
    bias = torch.tensor([0.0, 0.5, -2.0])
    h, deriv = v.clone(), torch.empty_like(v)
    torch.ops.sequencer_mlp.bias_gelu_(h, bias, deriv)
    ref_in = v + bias
    torch.testing.assert_close(h, torch.nn.functional.gelu(ref_in), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(deriv, torch.ops.aten.gelu_backward(torch.ones_like(ref_in), ref_in),
                               atol=2e-6, rtol=1e-6)
    g = torch.randn(7, 5)
    d = torch.rand(7, 5)
    expect = g * d
    db = torch.ops.sequencer_mlp.gelu_grad_bias_(g, d)
    torch.testing.assert_close(g, expect)
    torch.testing.assert_close(db, expect.sum(0), atol=1e-6, rtol=1e-6)


def test_unfusable_configurations_run_timms_forward():
    x = torch.randn(2, 3, 3, 16)
    _, ours = _pair(16, 32)
    assert ours.fusable(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not ours.fusable(x)
    assert not ours.fusable(x.double())
    with cpu_kernel_disabled():
        assert not ours.fusable(x)
    _, drop = _pair(16, 32, drop=0.1)
    assert not drop.train().fusable(x) and drop.eval().fusable(x)   # dropout only matters while training
    _, tanh = _pair(16, 32, act_layer=lambda: nn.GELU(approximate='tanh'))
    assert not tanh.fusable(x)
    _, relu = _pair(16, 32, act_layer=nn.ReLU)
    assert not relu.fusable(x)


def test_hooks_on_the_linears_are_honoured():
    """A hook on fc1 (FLOP counters, feature probes) turns the fused path off, so the hook still runs."""
    ref, ours = _pair(16, 32)
    seen = []
    handle = ours.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 3, 16)
    assert not ours.fusable(x)
    torch.testing.assert_close(ours(x), ref(x))
    assert seen == [torch.Size([2, 3, 3, 32])]
    handle.remove()
    assert ours.fusable(x)


def test_state_dict_keys_are_timms():
    ref, ours = _pair(16, 32)
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_switched_off_or_native_runs_timms_forward():
    """``set_engine(..., fused_mlp=False)`` keeps the fast class with timm's forward; 'native' gives timm's class."""
    ref, ours = _pair(16, 32)
    x = torch.randn(2, 3, 3, 16, requires_grad=True)
    set_engine(ours, 'fused', fused_mlp=False)
    assert type(ours) is FastMlp and not ours.fused and not ours.fusable(x)
    assert not type(ours(x).grad_fn).__name__.startswith('_FusedMlp')
    torch.testing.assert_close(ours(x), ref(x))
    set_engine(ours, 'native')
    assert type(ours) is TimmMlp and 'fused' not in vars(ours)
    torch.testing.assert_close(ours(x), ref(x))


def test_non_contiguous_input_and_frozen_weights():
    """A permuted (non-contiguous) input, and fine-tuning with the MLP frozen (only the input needs a gradient)."""
    ref, ours = _pair(24, 40)
    x = torch.randn(2, 24, 5, 3).permute(0, 3, 2, 1)          # (2, 3, 5, 24), not contiguous
    assert not x.is_contiguous() and ours.fusable(x)
    for m in (ref, ours):
        m.requires_grad_(False)
    g = torch.randn(2, 3, 5, 24)
    (ya, gxa, gpa), (yb, gxb, gpb) = _run(ref, x, g), _run(ours, x, g)
    assert all(p is None for p in gpa + gpb)
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gxb, gxa, atol=1e-5, rtol=1e-5)
