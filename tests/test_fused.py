"""The fused BiLSTM2D engine against native nn.LSTM: outputs, every gradient, models, compile, Triton."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sequencer import Sequencer2D, set_engine
from sequencer.fast import FastRNN2D, auto_engine, cpu_kernel, cpu_kernel_disabled
from sequencer.fast.lstm2d import fused_rnn2d
from sequencer.models.blocks import RNN2D

# The fused engine has two CPU implementations of its recurrence: the compiled kernel (csrc/) and the
# torch code (used under torch.compile, for float64 and where no compiler is found). Both are checked.
IMPLS = ['kernel', 'torch']


@pytest.fixture(params=IMPLS)
def impl(request):
    """Runs the test with the compiled CPU kernel and again with the torch implementation."""
    if request.param == 'torch':
        with cpu_kernel_disabled():
            yield 'torch'
        return
    if not cpu_kernel.enabled():
        pytest.skip(f'{cpu_kernel.ENV}=0')
    assert cpu_kernel.load(raise_errors=True), cpu_kernel.error()  # a C++ compiler is part of the dev setup
    yield 'kernel'


def _grads(module, x, engine, seed=1):
    """Output, input gradient and every parameter gradient of ``module`` run with ``engine`` (set in place:
    'native' is the plain ``RNN2D``, 'fused' / 'auto' the ``FastRNN2D`` with that engine)."""
    set_engine(module, engine)
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * g).sum().backward()
    return y.detach(), x.grad, {k: p.grad.clone() for k, p in module.named_parameters()}


def _assert_same(a, b, atol):
    (ya, gxa, gpa), (yb, gxb, gpb) = a, b
    assert ya.shape == yb.shape and ya.dtype == yb.dtype
    torch.testing.assert_close(ya, yb, atol=atol, rtol=0)
    torch.testing.assert_close(gxa, gxb, atol=atol, rtol=0)
    assert gpa.keys() == gpb.keys()
    for k in gpa:
        torch.testing.assert_close(gpa[k], gpb[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize('union,bidirectional,with_fc,shape', [
    ('cat', True, True, (3, 5, 7)),        # H != W, odd batch
    ('cat', True, True, (2, 6, 6)),
    ('cat', False, True, (1, 4, 6)),       # unidirectional
    ('cat', True, False, (3, 3, 4)),       # no fc
    ('add', True, True, (2, 6, 4)),
    ('add', False, True, (3, 3, 3)),
    ('vertical', True, False, (1, 4, 5)),
    ('horizontal', False, True, (3, 5, 2)),
    ('horizontal', True, True, (5, 1, 3)),  # single row
])
def test_fused_matches_native_fp32(union, bidirectional, with_fc, shape, impl):
    torch.manual_seed(0)
    hidden = 5
    out = (2 if bidirectional else 1) * hidden * (2 if union == 'cat' else 1)
    C = 12 if with_fc else out
    m = RNN2D(C, hidden, bidirectional=bidirectional, union=union, with_fc=with_fc)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-0.5, 0.5)
    x = torch.randn(*shape, C)
    native = _grads(m, x, 'native')
    fused = _grads(m, x, 'fused')
    assert type(m) is FastRNN2D and m.resolved_engine(x) == 'fused'
    _assert_same(native, fused, atol=1e-5)
    assert native[0].abs().max() > 0.05  # the comparison is not between zeros


def test_fused_matches_native_fp64_and_gradcheck():
    torch.manual_seed(0)
    m = RNN2D(6, 3, union='cat').double()
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    _assert_same(_grads(m, x, 'native'), _grads(m, x, 'fused'), atol=1e-12)
    # finite differences through the hand-written backward, w.r.t. the input and the LSTM weights
    set_engine(m, 'fused')
    names = ['rnn_v.weight_hh_l0_reverse', 'rnn_h.bias_hh_l0']
    params = dict(m.named_parameters())

    def f(x, *ws):
        return torch.func.functional_call(m, {**params, **dict(zip(names, ws))}, (x,))

    inputs = (x[:1, :2, :3].clone().requires_grad_(True),
              *[params[n].detach().clone().requires_grad_(True) for n in names])
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_no_bias_and_uneven_hidden(impl):
    torch.manual_seed(0)
    m = RNN2D(7, 3, bias=False, union='cat')
    x = torch.randn(3, 2, 5, 7)
    _assert_same(_grads(m, x, 'native'), _grads(m, x, 'fused'), atol=1e-5)


def _tiny_s(engine='auto', **kw):
    """A Sequencer2D-S-shaped model (same stage layout, patch sizes, union, fc), one block per stage, on
    ``engine``."""
    cfg = dict(layers=(1, 1, 1, 1), patch_sizes=(7, 2, 1, 1), embed_dims=(24, 48, 48, 48),
               hidden_sizes=(6, 12, 12, 12), mlp_ratios=(3, 3, 3, 3), num_classes=7)
    cfg.update(kw)
    return set_engine(Sequencer2D(**cfg), engine)


@pytest.mark.parametrize('size', [(56, 56), (42, 70)])
def test_whole_model_fused_equals_native(size, impl):
    torch.manual_seed(0)
    model = _tiny_s()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    x = torch.randn(3, 3, *size)
    res = {}
    for engine in ('native', 'fused'):
        set_engine(model, engine)
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        res[engine] = (y.detach(), xi.grad, {k: p.grad.clone() for k, p in model.named_parameters()})
    _assert_same(res['native'], res['fused'], atol=1e-5)
    set_engine(model, 'fused').eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), res['native'][0], atol=1e-5, rtol=0)


def test_state_dict_identical_between_engines():
    native = _tiny_s('native')
    fused = _tiny_s('fused')
    assert list(native.state_dict()) == list(fused.state_dict())
    assert any(k.endswith('rnn_tokens.rnn_v.weight_ih_l0_reverse') for k in fused.state_dict())
    fused.load_state_dict(native.state_dict())  # strict: a checkpoint of one engine loads into the other
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), native.eval()(x), atol=1e-5, rtol=0)


def test_engine_resolution(monkeypatch):
    """What a FastRNN2D runs: GRU and stacked recurrences always nn.LSTM / nn.GRU; 'fused' as set; 'auto' by the
    rule table, from the conditions of the call (gradients, autocast, the kernel)."""
    monkeypatch.setenv('SEQUENCER_AUTOTUNE', '0')   # the rule table alone (no measured choice)
    x = torch.randn(1, 2, 2, 8)
    gru = set_engine(RNN2D(8, 4, rnn_layer='gru'), 'auto')
    assert gru.resolved_engine(x) == 'native'
    set_engine(gru, 'fused')
    assert gru.resolved_engine(x) == 'native'       # GRU falls back
    stacked = set_engine(RNN2D(8, 4, num_layers=2), 'fused')
    assert stacked.resolved_engine(x) == 'native'   # stacked LSTMs fall back
    m = set_engine(RNN2D(8, 4), 'native')
    assert type(m) is RNN2D and not hasattr(m, 'resolved_engine')   # 'native': the plain module itself
    set_engine(m, 'fused')
    assert m.resolved_engine(x) == 'fused'
    with torch.no_grad():
        assert m.resolved_engine(x) == 'fused'
    set_engine(m, 'auto')
    kernel = cpu_kernel.available()
    # training (the parameters need gradients): fused, with or without the kernel
    assert m.resolved_engine(x) == auto_engine('cpu', torch.float32, False, True, kernel) == 'fused'
    with torch.no_grad():                                                  # CPU inference: fused with the
        assert m.resolved_engine(x) == ('fused' if kernel else 'native')   # kernel, nn.LSTM without it
        assert m.resolved_engine(x, compiling=True) == 'fused'             # compiled: like training
    with cpu_kernel_disabled(), torch.no_grad():
        assert m.resolved_engine(x) == 'native'
    with torch.autocast('cpu', dtype=torch.bfloat16):                      # bf16 autocast: fused with the
        assert m.resolved_engine(x) == ('fused' if kernel else 'native')   # kernel, also for a bf16 input
        assert m.resolved_engine(x.bfloat16()) == m.resolved_engine(x)     # (the weights decide)
    with cpu_kernel_disabled(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert m.resolved_engine(x) == 'native'                            # autocast without the kernel
    with pytest.raises(ValueError, match='engine must be one of'):
        set_engine(_tiny_s(), 'cudnn')


@pytest.mark.parametrize('conditions, engine', [
    # (device, weights' dtype, autocast, gradients or compiling, kernel)
    (('cpu', torch.float32, False, True, True), 'fused'),        # CPU training, compiled kernel
    (('cpu', torch.float32, False, False, True), 'fused'),       # CPU inference, compiled kernel
    (('cpu', torch.float32, True, False, True), 'fused'),        # bf16 autocast, kernel
    (('cpu', torch.float32, False, False, False), 'native'),     # inference without the kernel: oneDNN
    (('cpu', torch.float32, False, True, False), 'fused'),       # training / compiled without it: torch code
    (('cpu', torch.float32, True, True, False), 'native'),       # autocast without the kernel
    (('cpu', torch.float64, False, True, None), 'fused'),        # float64 training (gradient checks)
    (('cpu', torch.float64, False, False, True), 'native'),      # float64 inference
    (('cpu', torch.bfloat16, False, True, True), 'native'),      # bf16 weights
    (('cuda', torch.float32, True, True, True), 'fused'),        # GPU training / compiled under autocast, Triton
    (('cuda', torch.float32, True, False, True), 'native'),      # eager inference: cuDNN
    (('cuda', torch.float32, True, True, False), 'native'),      # no Triton, or the hidden size does not fit
    (('cuda', torch.float32, False, True, True), 'native'),      # float32 on the GPU: not timed
    (('cuda', torch.bfloat16, True, True, True), 'native'),      # bf16 weights
    (('mps', torch.float32, False, True, False), 'native'),      # other devices
    (('meta', torch.float32, False, True, False), 'native'),
])
def test_auto_rule_table(conditions, engine):
    assert auto_engine(*conditions) == engine


def test_auto_rule_table_is_read_top_down(monkeypatch):
    """The first row whose conditions all hold (None: any) decides; no row: nn.LSTM. FastRNN2D asks the table
    with the call's conditions."""
    from sequencer.fast import modules, rules
    monkeypatch.setenv('SEQUENCER_AUTOTUNE', '0')   # the rule table alone (no measured choice)
    table = (('cpu', None, None, True, None, 'fused'), ('cpu', torch.float32, None, None, None, 'first'),
             ('cpu', torch.float32, None, None, None, 'second'))
    monkeypatch.setattr(rules, 'AUTO_RULES', table)
    assert auto_engine('cpu', torch.float64, True, True, False) == 'fused'
    assert auto_engine('cpu', torch.float32, False, False, True) == 'first'
    assert auto_engine('cuda', torch.float32, False, True, True) == 'native'   # no row matches
    seen = []
    monkeypatch.setattr(modules, 'auto_engine', lambda *c: seen.append(c) or 'native')
    m = set_engine(RNN2D(8, 4), 'auto')
    x = torch.randn(1, 2, 2, 8)
    with torch.no_grad():
        m(x)
        m.resolved_engine(x, compiling=True)
    m(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        m(x)
    kernel = cpu_kernel.available()
    assert seen == [('cpu', torch.float32, False, False, kernel), ('cpu', torch.float32, False, True, kernel),
                    ('cpu', torch.float32, False, True, kernel), ('cpu', torch.float32, True, True, kernel)]


def test_fused_engine_follows_replaced_parameters():
    """The fused engine uses the LSTM parameters of the moment: replaced by assignment, computed by a
    parametrization, or swapped in by ``torch.func.functional_call`` (and not kept after it)."""
    from torch.func import functional_call
    from torch.nn.utils import parametrize
    torch.manual_seed(0)
    m = RNN2D(6, 4)
    x = torch.randn(2, 3, 5, 6)

    def both(call=lambda: m(x)):
        out = {}
        for engine in ('fused', 'native'):
            set_engine(m, engine)
            out[engine] = call()
        assert torch.allclose(out['fused'], out['native'], atol=1e-5), (out['fused'] - out['native']).abs().max()
        return out['fused']

    with torch.no_grad():
        before = both()
        m.rnn_h.weight_hh_l0_reverse = torch.nn.Parameter(torch.randn_like(m.rnn_h.weight_hh_l0_reverse))
        assigned = both()
        assert not torch.allclose(assigned, before, atol=1e-3)
        swapped = {k: torch.zeros_like(v) if k.startswith('rnn_v') else v for k, v in m.named_parameters()}
        both(lambda: functional_call(m, swapped, (x,)))
        assert torch.allclose(both(), assigned, atol=1e-6)   # the module's own parameters again

    class Half(torch.nn.Module):
        def forward(self, w):
            return 0.5 * w

    parametrize.register_parametrization(m.rnn_v, 'weight_hh_l0', Half())
    with torch.no_grad():
        assert not torch.allclose(both(), assigned, atol=1e-4)


def test_torch_func_transforms():
    """torch.func.grad over a whole model (per-sample gradients, meta-learning): the fused paths step aside for
    the plain ops, whose autograd functions the transforms support, and the gradients equal autograd's."""
    from torch.func import functional_call, grad
    torch.manual_seed(0)
    m = _tiny_s()
    torch.nn.init.normal_(m.head.fc.weight, std=0.5)   # zero at init: no gradient would reach the blocks
    x = torch.randn(1, 3, 28, 28)
    params = {k: v.detach() for k, v in m.named_parameters()}
    g = grad(lambda p: functional_call(m, p, (x,)).square().sum())(params)
    m.zero_grad(set_to_none=True)
    m(x).square().sum().backward()
    for k, p in m.named_parameters():   # float32 rounding, relative to each gradient's largest entry
        assert (g[k] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-7, k
    assert m.stages[0].blocks[0].rnn_tokens.rnn_v.weight_hh_l0.grad.abs().max() > 1e-6


def test_lstm_gradients_are_kept_as_computed():
    """Autograd keeps the fused engine's parameter gradients as the CPU kernel's path (and the GPU path, which
    shares ``_param_grads``) returns them, slices of one buffer per kind (no per-parameter copy): each
    direction's slice follows the previous one in memory. (The torch implementation reorders the gates.)"""
    if not cpu_kernel.available():
        pytest.skip('no CPU kernel')
    m = set_engine(RNN2D(8, 4), 'fused')
    m(torch.randn(2, 3, 3, 8, requires_grad=True)).sum().backward()
    params = [p for rnn in (m.rnn_v, m.rnn_h) for p in rnn.parameters()]   # (w_ih, w_hh, b_ih, b_hh) x 4
    for kind in range(4):
        grads = params[kind::4]
        step = grads[0].numel() * grads[0].element_size()
        assert [g.grad.data_ptr() - grads[0].grad.data_ptr() for g in grads] == [i * step for i in range(4)], kind


def test_gru_model_runs_with_fused_setting():
    torch.manual_seed(0)
    model = _tiny_s(rnn_layer='gru').eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        ref = set_engine(model, 'native')(x)
        torch.testing.assert_close(set_engine(model, 'fused')(x), ref)


def test_autocast_bf16_dtype_and_values():
    """The united output (no fc: the recurrences alone) under bf16 autocast: bfloat16 from both engines, within
    bfloat16 rounding of each other."""
    torch.manual_seed(0)
    m = RNN2D(32, 8, union='cat', with_fc=False)
    x = torch.randn(2, 4, 5, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        native = m(x)
        out = {'native': native, 'fused': fused_rnn2d(set_engine(m, 'fused'), x)}
    assert out['fused'].dtype == out['native'].dtype == torch.bfloat16
    torch.testing.assert_close(out['fused'].float(), out['native'].float(), atol=3e-2, rtol=0)
    # gradients flow in the dtypes of the input and the parameters
    xr = x.clone().requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert m.resolved_engine(xr) == 'fused'
        y = m(xr)
    y.float().sum().backward()
    assert xr.grad.dtype == torch.float32 and m.rnn_v.weight_hh_l0.grad.dtype == torch.float32


def test_fused_layer_does_not_query_autocast_availability_on_cpu_or_cuda(monkeypatch):
    """torch 2.11's torch.compile cannot trace ``torch.amp.is_autocast_available`` (seen on an H200: a graph
    break in every fused layer, an error under fullgraph), so the fused layer must not ask it for CPU or CUDA
    tensors, whose autocast always exists."""
    def refuse(device_type):
        raise AssertionError(f'is_autocast_available({device_type!r}) was called')

    monkeypatch.setattr(torch.amp, 'is_autocast_available', refuse)
    torch.manual_seed(0)
    m = set_engine(RNN2D(16, 4), 'fused')
    x = torch.randn(2, 3, 5, 16, requires_grad=True)
    for autocast in (False, True):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            y = m(x)
        y.float().sum().backward()
    assert x.grad is not None


@pytest.mark.slow
def test_torch_compile_fused_whole_graph(impl):
    """The fused engine compiles without graph breaks and matches eager (forward and backward).

    AOT autograd traces the forward and the hand-written backward (backend 'aot_eager'); inductor's C++
    code generation is skipped here because it takes minutes on two CPU cores.
    """
    torch.manual_seed(0)
    m = set_engine(Sequencer2D(layers=(1, 1, 1, 1), patch_sizes=(7, 2, 1, 1), embed_dims=(16, 32, 32, 32),
                               hidden_sizes=(4, 8, 8, 8), mlp_ratios=(2, 2, 2, 2), num_classes=5), 'fused')
    x = torch.randn(2, 3, 28, 42)
    ref = m(x)
    ref.sum().backward()
    ref_grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    out = torch.compile(m, backend='aot_eager', fullgraph=True)(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for k, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize('engine', ['fused', 'auto'])
def test_a_fresh_fast_model_compiles_whole(engine):
    """A fast model compiled before it ever ran eagerly (as ``sequencer benchmark --compile`` and
    benchmarks/check_compile.py do) is one graph, with the eager outputs."""
    torch.manual_seed(0)
    m = _tiny_s(engine).eval()
    x = torch.randn(1, 3, 28, 28)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(m, backend='eager', fullgraph=True)(x)
        torch.testing.assert_close(out, m(x), atol=1e-5, rtol=0)


_INTERPRETER_CHECK = textwrap.dedent('''
    import contextlib
    import torch
    from sequencer.fast import cpu_kernel_disabled, set_engine, triton_on_cpu, triton_lstm
    from sequencer.fast import lstm2d as fl
    from sequencer.fast.triton_lstm import lstm_backward_triton, lstm_recurrence_triton
    from sequencer.models.blocks import RNN2D
    torch.manual_seed(0)
    B, H, W, hid = 2, 3, 5, 8          # H != W: padded steps and sequences
    kinds = ((True, False), (True, True), (False, False), (False, True))
    D, G = len(kinds), 4 * hid
    rows, inv, prev, padded = fl._build_plan(B, H, W, kinds, "cpu")
    T, DN = rows.shape
    N, R = DN // D, B * H * W * D
    # the Triton kernels take nn.LSTM's layout; the torch implementation its internal one
    xp = torch.randn(R + 1, G)
    xp[R] = 0
    w = torch.randn(D, G, hid) * 0.3
    xp_int = fl._to_internal(xp.t(), hid).t().contiguous()
    w_int = torch.stack([fl._to_internal(w[d], hid) for d in range(D)])
    y_ref = torch.zeros(R + 1, hid)
    ref = fl._recurrence_torch(xp_int, w_int.transpose(1, 2), rows, inv, D, N, hid, y_ref[:R], True)
    gy = torch.randn(R + 1, hid)
    gy[R] = 0
    dxp_int = torch.empty(R, G)
    fl._backward_torch(gy, *ref, w_int, rows, inv, D, N, hid, dxp_int)
    dxp_ref = fl._from_internal(dxp_int.t(), hid).t()
    for reload in (False, True):   # W_hh held for the whole sequence, or read at every step
        cfg = triton_lstm.Config(block_n=16, num_warps=4, reload=reload)
        y_tri = torch.full((R + 1, hid), float('nan'))
        tri = lstm_recurrence_triton(xp, w, rows, D, N, hid, y_tri, True, config=cfg)
        errs = [(y_ref[:R] - y_tri[:R]).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(ref, tri)]
        print(f'FORWARD_{reload}', max(errs), y_ref.abs().max().item())
        # backward recursion: the gate gradients of every token against the torch backward
        dxp_tri = torch.full((R + 1, G), float('nan'))
        lstm_backward_triton(gy, *tri, w, rows, D, N, hid, dxp_tri, config=cfg)
        print(f'BACKWARD_{reload}', (dxp_ref - dxp_tri[:R]).abs().max().item(), dxp_ref.abs().max().item())
    # bfloat16 products (autocast): input gates, weights and output in bfloat16, within bfloat16 rounding
    y_lp = torch.zeros(R + 1, hid, dtype=torch.bfloat16)
    lp = lstm_recurrence_triton(xp.bfloat16(), w.bfloat16(), rows, D, N, hid, y_lp, True)
    print('LOWP_FORWARD', (y_ref[:R] - y_lp[:R].float()).abs().max().item(), y_ref.abs().max().item())
    dxp_lp = torch.zeros(R + 1, G, dtype=torch.bfloat16)
    assert all(t.dtype == torch.float16 for t in lp)   # saved in float16
    lstm_backward_triton(gy.bfloat16(), *lp, w.bfloat16(), rows, D, N, hid, dxp_lp)
    print('LOWP_BACKWARD', (dxp_ref - dxp_lp[:R].float()).abs().max().item(), dxp_ref.abs().max().item())
    # a whole BiLSTM2D through both kernels against native nn.LSTM: output, input and parameter gradients
    stack = contextlib.ExitStack()
    stack.enter_context(triton_on_cpu())   # for the rest of this script
    calls = []
    for name in ('lstm_recurrence_triton', 'lstm_backward_triton'):
        def spy(*args, _f=getattr(triton_lstm, name), _name=name, **kw):
            calls.append(_name)
            return _f(*args, **kw)
        setattr(triton_lstm, name, spy)
    m = RNN2D(6, hid)
    x = torch.randn(3, 4, 5, 6)
    res = {}
    for engine in ('native', 'fused'):
        set_engine(m, engine)
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with cpu_kernel_disabled():
            out = m(xi)
            (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        res[engine] = [out.detach(), xi.grad] + [p.grad for p in m.parameters()]
    assert calls == ['lstm_recurrence_triton', 'lstm_backward_triton'], calls
    print('MODULE', max((a - b).abs().max().item() for a, b in zip(res['native'], res['fused'])),
          min(a.abs().max().item() for a in res['native']))
    # the same module under bfloat16 autocast: bfloat16 products, float32 cell; within bfloat16 rounding
    m.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    with cpu_kernel_disabled(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = m(xi)
    assert out.dtype == torch.bfloat16
    (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    lp = [out.detach().float(), xi.grad] + [p.grad for p in m.parameters()]
    print('MODULE_BF16', max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(res['native'], lp)),
          min(a.abs().max().item() for a in res['native']))
''')


@pytest.mark.slow
def test_triton_kernels_through_interpreter():
    """The GPU recurrence kernels (forward and backward), run by Triton's interpreter on CPU tensors, equal
    the torch recurrence, and a whole BiLSTM2D run through them equals native nn.LSTM, gradients included."""
    pytest.importorskip('triton')
    env = dict(os.environ, TRITON_INTERPRET='1')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, '-c', _INTERPRETER_CHECK], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = {}
    for ln in proc.stdout.splitlines():
        name, err, scale = ln.split()
        found[name] = (float(err), float(scale))
    assert set(found) == {'FORWARD_False', 'BACKWARD_False', 'FORWARD_True', 'BACKWARD_True', 'LOWP_FORWARD',
                          'LOWP_BACKWARD', 'MODULE', 'MODULE_BF16'}, proc.stdout
    for name, (err, scale) in found.items():
        if name.startswith('LOWP'):       # bfloat16 products and outputs: within a few bfloat16 roundings
            assert err < 2e-2 * scale and scale > 1e-3, (name, err, scale)
        elif name == 'MODULE_BF16':       # the largest error relative to each tensor's largest entry
            assert err < 5e-2 and scale > 1e-3, (name, err, scale)
        else:
            assert err < 1e-5 and scale > 1e-3, (name, err, scale)



_GPU_PATH_OPS = textwrap.dedent('''
    import collections
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from sequencer.fast import cpu_kernel_disabled, set_engine, triton_on_cpu
    from sequencer.models.blocks import RNN2D

    class Count(TorchDispatchMode):   # every operator dispatched while active, by name
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    m = set_engine(RNN2D(8, 4), 'fused')
    x = torch.randn(2, 3, 3, 8, requires_grad=True)
    with triton_on_cpu(), cpu_kernel_disabled():
        m(x).sum().backward()   # builds the index plan of this shape (cached)
        for autocast in (False, True):
            m.zero_grad(set_to_none=True)
            x.grad = None
            count = Count()
            with count:
                with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
                    y = m(x)
                y.float().sum().backward()
            print(autocast, sum(count.ops.values()), ','.join(sorted(count.ops)))
''')


@pytest.mark.slow
def test_gpu_path_dispatches_few_operators():
    """Host work of the GPU path: one BiLSTM2D's forward + backward (run here through Triton's interpreter,
    the same operators as on CUDA) stays within a fixed operator budget, and the parameters reach the
    kernels without per-call gate reordering (no advanced indexing, no scaling multiplications)."""
    pytest.importorskip('triton')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, '-c', _GPU_PATH_OPS], env=dict(os.environ, TRITON_INTERPRET='1'),
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split()
    assert len(lines) == 6, proc.stdout
    for autocast, total, names in zip(lines[0::3], lines[1::3], lines[2::3]):
        ops = names.split(',')
        assert 'sequencer_triton.lstm2d_forward.default' in ops and 'sequencer_triton.lstm2d_backward.default' in ops
        assert 'aten.index.Tensor' not in ops and 'aten.mul.Tensor' not in ops, ops
        assert int(total) <= (92 if autocast == 'True' else 78), (autocast, total)   # 84 / 71 now



_COMPILED_TRAINING = textwrap.dedent('''
    import torch
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from sequencer import Sequencer2D, set_engine
    from sequencer.fast import cpu_kernel_disabled, triton_on_cpu
    torch.manual_seed(0)
    m = Sequencer2D(layers=(1, 1, 1, 1), patch_sizes=(7, 2, 1, 1), embed_dims=(16, 32, 32, 32),
                    hidden_sizes=(4, 8, 8, 8), mlp_ratios=(2, 2, 2, 2), num_classes=5)
    # eager pre-norms as compiled graphs run them (no Triton LayerNorm), for exactness
    set_engine(m, 'fused', fused_norm=False)
    x = torch.randn(2, 3, 28, 42)
    for autocast in (False, True):
        graphs = {}

        def keep(name):
            def compiler(gm, inputs):
                graphs[name] = gm.code
                return make_boxed_func(gm.forward)
            return compiler

        with triton_on_cpu(), cpu_kernel_disabled():
            m.zero_grad(set_to_none=True)
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
                ref = m(x)
            ref.float().sum().backward()
            ref_grads = [p.grad.clone() for p in m.parameters()]
            m.zero_grad(set_to_none=True)
            torch._dynamo.reset()
            cm = torch.compile(m, backend=aot_autograd(fw_compiler=keep('fw'), bw_compiler=keep('bw')),
                               fullgraph=True)
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
                out = cm(x)
            out.float().sum().backward()
        err = max([(out.float() - ref.float()).abs().max().item()]
                  + [(p.grad - g).abs().max().item() for p, g in zip(m.parameters(), ref_grads)])
        print(autocast, err, graphs['fw'].count('sequencer_triton.lstm2d_forward'),
              graphs['bw'].count('sequencer_triton.lstm2d_backward'))
''')


@pytest.mark.slow
def test_compiled_training_keeps_the_triton_kernels():
    """Training under torch.compile with the GPU path (run here through Triton's interpreter): one graph
    (fullgraph) whose forward calls the Triton forward op once per BiLSTM2D and whose backward calls the
    Triton backward op once per BiLSTM2D, with the eager model's outputs and gradients, in float32 and under
    bfloat16 autocast."""
    pytest.importorskip('triton')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, '-c', _COMPILED_TRAINING], env=dict(os.environ, TRITON_INTERPRET='1'),
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln.split() for ln in proc.stdout.splitlines()]
    assert [ln[0] for ln in lines] == ['False', 'True'], proc.stdout
    for autocast, err, n_fw, n_bw in lines:
        assert (n_fw, n_bw) == ('4', '4'), (autocast, n_fw, n_bw)   # one BiLSTM2D per stage
        assert float(err) < 1e-5, (autocast, err)


_OPCHECK = textwrap.dedent('''
    import torch
    from sequencer.fast import lstm2d as fl
    from sequencer.fast import triton_lstm
    torch.manual_seed(0)
    kinds = ((True, False), (True, True), (False, False), (False, True))
    rows, _, _, _ = fl._build_plan(2, 3, 4, kinds, "cpu")
    D, hid = 4, 8
    N, R = rows.shape[1] // D, 2 * 3 * 4 * D
    for dt in (torch.float32, torch.bfloat16):
        xp, w = torch.randn(R, 4 * hid).to(dt), (torch.randn(D, 4 * hid, hid) * 0.3).to(dt)
        for save in (False, True):
            torch.library.opcheck(torch.ops.sequencer_triton.lstm2d_forward.default, (xp, w, rows, D, N, hid, save))
        _, act, cs = triton_lstm.forward(xp, w, rows, D, N, hid, True)
        gy = torch.randn(R, hid).to(dt)
        torch.library.opcheck(torch.ops.sequencer_triton.lstm2d_backward.default, (gy, act, cs, w, rows, D, N, hid))
    print('OK')
''')


@pytest.mark.slow
def test_triton_ops_pass_opcheck():
    """The Triton kernels' torch ops (run here through Triton's interpreter) keep the custom-op contract that
    torch.compile relies on: schema (no aliased outputs), fake implementations matching the real ones."""
    pytest.importorskip('triton')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, '-c', _OPCHECK], env=dict(os.environ, TRITON_INTERPRET='1'), cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith('OK'), proc.stderr[-2000:]


def test_triton_supported_sizes():
    """The Triton kernels run hidden sizes whose power-of-two padding fits the GPU's shared memory (up to 128
    with low-precision products, 64 in float32); others fall back to the torch code."""
    from sequencer.fast.triton_lstm import supported
    assert supported(48, True) and supported(96, True) and supported(128, True) and not supported(192, True)
    assert supported(48, False) and supported(64, False) and not supported(96, False)


def test_cpu_kernel_matches_torch_implementation_at_model_shapes():
    """The kernel against the torch implementation on a stage of Sequencer2D-S (hidden 48, 4 directions),
    forward and backward, with a non-square grid and an odd batch."""
    if not cpu_kernel.enabled():
        pytest.skip(f'{cpu_kernel.ENV}=0')
    assert cpu_kernel.load(raise_errors=True), cpu_kernel.error()
    torch.manual_seed(0)
    m = RNN2D(64, 48)
    x = torch.randn(3, 9, 14, 64)
    kernel = _grads(m, x, 'fused')
    with cpu_kernel_disabled():
        torch_impl = _grads(m, x, 'fused')
    _assert_same(kernel, torch_impl, atol=1e-5)
    assert kernel[0].abs().max() > 0.05


@pytest.mark.slow
def test_build_kernel_command_and_opt_out(tmp_path):
    """`sequencer build-kernel` self-checks the kernel; SEQUENCER_CPU_KERNEL=0 falls back to the torch code."""
    env = dict(os.environ)
    r = subprocess.run([sys.executable, '-m', 'sequencer.cli', 'build-kernel'], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert 'self-check' in r.stdout and 'No CUDA runtime' not in r.stderr
    env[cpu_kernel.ENV] = '0'
    env['SEQUENCER_AUTOTUNE'] = '0'   # the rule table alone decides 'auto' (no measured choice)
    code = textwrap.dedent("""
        import torch
        from sequencer.fast import cpu_kernel, set_engine
        from sequencer.models.blocks import RNN2D
        m = set_engine(RNN2D(8, 4), 'auto')
        x = torch.randn(1, 3, 3, 8)
        with torch.no_grad():
            print(m.resolved_engine(x), cpu_kernel.available())
        set_engine(m, 'fused')
        m(x).sum().backward()
    """)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ['native', 'False']
    r = subprocess.run([sys.executable, '-m', 'sequencer.cli', 'build-kernel'], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 2 and 'disabled' in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_kernel_scratch_buffers_are_per_thread_and_never_returned():
    """The CPU kernel path reuses per-thread scratch buffers: concurrent threads, and outputs kept across
    calls, must not see each other's data."""
    import threading

    from sequencer.fast.lstm2d import release_workspace
    torch.manual_seed(0)
    model = _tiny_s('fused').eval()
    xs = [torch.randn(2, 3, 56, 56) for _ in range(4)]
    with torch.no_grad():
        expected = [model(x) for x in xs]            # sequential; every output must survive later calls
        assert all(torch.equal(model(x), e) for x, e in zip(xs, expected))
    results = {}

    def work(i):
        with torch.no_grad():
            for _ in range(3):
                results[i] = model(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, e in enumerate(expected):
        torch.testing.assert_close(results[i], e, atol=1e-6, rtol=0)
    release_workspace()
    with torch.no_grad():
        torch.testing.assert_close(model(xs[0]), expected[0], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_cpu_kernel_build_falls_back_to_the_next_flags():
    """A build that fails (here: a flag the compiler rejects) is followed by the next variant; when every
    variant fails, the fused engine warns once and runs its torch implementation."""
    if not cpu_kernel.enabled():
        pytest.skip(f'{cpu_kernel.ENV}=0')
    code = textwrap.dedent("""
        import warnings
        import torch
        from sequencer.fast import cpu_kernel, set_engine
        from sequencer.models.blocks import RNN2D
        good = cpu_kernel._variants()
        bad = ('broken_flags', ['-fno-such-flag-for-sequencer'], [])
        cpu_kernel._variants = lambda: [bad] + good
        assert cpu_kernel.load()
        print(cpu_kernel._state['name'] == 'sequencer_lstm2d_' + good[0][0])
        cpu_kernel._state.update(tried=False, ok=False)
        cpu_kernel._variants = lambda: [bad]
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            m = set_engine(RNN2D(8, 4), 'fused')
            y = m(torch.randn(1, 3, 3, 8))
        print(cpu_kernel.available(), sum('could not be built' in str(x.message) for x in w))
    """)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ['True', 'False', '1']


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_fused_engine_on_cuda_matches_native():
    """On a GPU: the Triton kernels (forward and backward) against the exact result (native nn.LSTM in float64
    on the CPU), outputs and every gradient, within 1e-5. (cuDNN's float32 LSTM is not held to this bound: on
    an H200 it differed from the exact result by up to 1.35e-5.)"""
    pytest.importorskip('triton')
    from sequencer.fast.runtime import triton_ok
    assert triton_ok()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    x = torch.randn(3, 7, 9, 32)      # odd batch, H != W
    g = torch.randn(3, 7, 9, 32)

    def run(module, device, dtype, engine):
        module = set_engine(copy.deepcopy(module).to(device, dtype), engine)
        xi = x.to(device, dtype).requires_grad_(True)
        y = module(xi)
        (y * g.to(device, dtype)).sum().backward()
        return [t.detach().double().cpu() for t in [y, xi.grad] + [p.grad for p in module.parameters()]]

    for m in (RNN2D(32, 24), RNN2D(32, 24, bidirectional=False), RNN2D(32, 24, union='add', bias=False)):
        exact = run(m, 'cpu', torch.float64, 'native')
        for a, b in zip(exact, run(m, 'cuda', torch.float32, 'fused')):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_fused_engine_on_cuda_under_bf16_autocast_and_compile():
    """On a GPU under bfloat16 autocast: the fused engine (bfloat16 tensor-core products, float32 cell) stays
    within bfloat16 rounding of the exact result (float64 on the CPU), output and every gradient; and
    torch.compile keeps the Triton kernels in one graph (fullgraph) with the eager outputs, and compiled
    training stays within the same bound of the exact gradients."""
    pytest.importorskip('triton')
    torch.manual_seed(0)
    m = RNN2D(64, 48)
    x = torch.randn(4, 8, 6, 64)
    g = torch.randn(4, 8, 6, 64)

    def run(device, dtype, autocast):
        module = set_engine(copy.deepcopy(m).to(device, dtype), 'fused')
        xi = x.to(device, dtype).requires_grad_(True)
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
            y = module(xi)
        if autocast:
            assert y.dtype == torch.bfloat16
        (y.to(dtype) * g.to(device, dtype)).sum().backward()
        return [t.detach().double().cpu() for t in [y, xi.grad] + [p.grad for p in module.parameters()]]

    exact = run('cpu', torch.float64, False)
    for (name, _), a, b in zip([('y', 0), ('x.grad', 0)] + list(m.named_parameters()), exact,
                               run('cuda', torch.float32, True)):
        rel = ((a - b).abs().max() / a.abs().max()).item()
        assert rel < 2e-2, (name, rel)     # measured on an H200: 2.4e-3 - 8.5e-3
    mc = set_engine(copy.deepcopy(m).cuda(), 'fused')
    torch._dynamo.reset()
    cm = torch.compile(mc, fullgraph=True)
    xc = x.cuda()
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        torch.testing.assert_close(cm(xc).float(), mc(xc).float(), atol=2e-2, rtol=2e-2)
    # compiled training (inductor): gradients within bfloat16 rounding of the exact ones, as eager's above
    mc.zero_grad(set_to_none=True)
    xi = xc.clone().requires_grad_(True)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        y = cm(xi)
    (y.float() * g.cuda()).sum().backward()
    compiled = [t.detach().double().cpu() for t in [y, xi.grad] + [p.grad for p in mc.parameters()]]
    for (name, _), a, b in zip([('y', 0), ('x.grad', 0)] + list(m.named_parameters()), exact, compiled):
        rel = ((a - b).abs().max() / a.abs().max()).item()
        assert rel < 2e-2, ('compiled', name, rel)


def test_kernel_backward_consumes_saved_gates_only_when_the_graph_is_freed(monkeypatch):
    """The kernel's backward turns the saved gate activations into gate gradients in place. A graph kept for
    another backward (retain_graph, as the ERF analysis does) must work on a copy: a second backward over the
    same graph then gives the same gradients as the first, and as native nn.LSTM."""
    if not cpu_kernel.enabled():
        pytest.skip(f'{cpu_kernel.ENV}=0')
    assert cpu_kernel.load(raise_errors=True), cpu_kernel.error()
    from sequencer.fast import lstm2d
    kept = []
    real = lstm2d._graph_kept
    monkeypatch.setattr(lstm2d, '_graph_kept', lambda: kept.append(real()) or kept[-1])
    torch.manual_seed(0)
    layer = set_engine(RNN2D(8, 5), 'fused')
    x = torch.randn(3, 5, 7, 8, requires_grad=True)
    g = torch.randn(3, 5, 7, 8)
    params = list(layer.parameters())
    y = layer(x)
    first = torch.autograd.grad(y, [x, *params], g, retain_graph=True)
    second = torch.autograd.grad(y, [x, *params], g)
    assert kept == [True, False]
    set_engine(layer, 'native')
    want = torch.autograd.grad(layer(x), [x, *params], g)
    for a, b, w in zip(first, second, want):
        torch.testing.assert_close(a, w, atol=1e-5, rtol=0)
        torch.testing.assert_close(b, w, atol=1e-5, rtol=0)


@pytest.mark.parametrize('engine', ['fused', 'auto'])
def test_inference_mode_then_no_grad_then_training(engine):
    """A model run under torch.inference_mode, then under no_grad, with grad, and trained: the kept scratch
    buffers are normal tensors (an inference tensor could not be written outside inference mode), and every run
    gives the same outputs."""
    from sequencer import create_model
    from sequencer.fast import lstm2d
    lstm2d.release_workspace()
    torch.manual_seed(0)
    model = create_model('sequencer2d_s', layers=[1, 1, 1, 1], num_classes=10, rnn_engine=engine).eval()
    torch.nn.init.normal_(model.head.fc.weight, std=0.02)
    x = torch.randn(2, 3, 64, 48)
    with torch.inference_mode():
        first = model(x)
    with torch.no_grad():
        assert torch.equal(model(x), first)
    torch.testing.assert_close(model(x), first, atol=0, rtol=0)
    model.train()
    model(x).sum().backward()
    model.eval()
    with torch.inference_mode():
        assert torch.equal(model(x), first)


def test_inference_under_no_grad_keeps_nothing_for_a_backward(monkeypatch):
    """Under no_grad, with the parameters still requiring grad (a model in eval mode as loaded), the compiled
    recurrence runs without saving its gate activations and cell states and the fused MLP without GELU's
    derivative: autograd's needs_input_grad follows requires_grad even there, so the fused paths are told grad
    mode at apply. With grad mode on, both keep what the backward needs."""
    if not cpu_kernel.enabled():
        pytest.skip(f'{cpu_kernel.ENV}=0')
    assert cpu_kernel.load(raise_errors=True), cpu_kernel.error()
    seen = {'lstm_save': [], 'gelu_deriv': []}
    lstm_forward, bias_gelu = torch.ops.sequencer_lstm2d.forward, torch.ops.sequencer_mlp.bias_gelu_

    def lstm_spy(*args):
        seen['lstm_save'].append(args[9])   # (xp, bias, whh_t, B, H, W, kinds, hidden, y, save, xin)
        return lstm_forward(*args)

    def gelu_spy(h, bias, deriv):
        seen['gelu_deriv'].append(deriv.numel() > 0)
        return bias_gelu(h, bias, deriv)

    monkeypatch.setattr(torch.ops.sequencer_lstm2d, 'forward', lstm_spy)
    monkeypatch.setattr(torch.ops.sequencer_mlp, 'bias_gelu_', gelu_spy)
    model = Sequencer2D(layers=(1, 1, 1, 1), embed_dims=(32, 32, 32, 32), hidden_sizes=(8, 8, 8, 8),
                        patch_sizes=(4, 2, 1, 1), num_classes=5).eval()
    set_engine(model, 'fused')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert seen['lstm_save'] and not any(seen['lstm_save']), seen
    assert seen['gelu_deriv'] and not any(seen['gelu_deriv']), seen
    seen['lstm_save'].clear(), seen['gelu_deriv'].clear()
    y_grad = model(x)
    assert all(seen['lstm_save']) and all(seen['gelu_deriv']), seen
    assert torch.allclose(y, y_grad, atol=1e-6)
    y_grad.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


V4_FLAGS = {'avx512f', 'avx512bw', 'avx512cd', 'avx512dq', 'avx512vl', 'avx2', 'fma', 'bmi2'}


@pytest.mark.parametrize('flags, request_, first', [
    (V4_FLAGS, None, 'x86_64_v4'),
    (V4_FLAGS, 'x86_64_v3', 'x86_64_v3'),
    (V4_FLAGS, 'x86-64-v3', 'x86_64_v3'),
    (V4_FLAGS, 'baseline', 'x86_64'),
    ({'avx2', 'fma', 'bmi2'}, None, 'x86_64_v3'),
    ({'sse2'}, None, 'x86_64'),
])
def test_cpu_kernel_level_follows_the_cpu_and_the_request(monkeypatch, flags, request_, first):
    """The kernel is built for the widest x86-64 level the CPU runs, or the lower one SEQUENCER_CPU_ISA asks for;
    the baseline builds (with and without OpenMP) always follow as fallbacks."""
    monkeypatch.setattr(cpu_kernel.platform, 'machine', lambda: 'x86_64')
    monkeypatch.setattr(cpu_kernel, '_cpu_flags', lambda: set(flags))
    if request_ is None:
        monkeypatch.delenv(cpu_kernel.ISA_ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_kernel.ISA_ENV, request_)
    names = [name for name, _, _ in cpu_kernel._variants()]
    assert names[0] == first and names[-2:] == ['x86_64', 'x86_64_noomp']
    assert cpu_kernel.isa_level() == first
    assert len(names) == len(set(names))


@pytest.mark.parametrize('request_, message', [
    ('x86_64_v4', 'this CPU does not run that x86-64 level (it runs x86_64_v3, baseline)'),
    ('avx9', "SEQUENCER_CPU_ISA must be 'auto', 'x86_64_v4', 'x86_64_v3' or 'baseline', got 'avx9'"),
])
def test_cpu_kernel_level_request_that_cannot_be_built_is_refused(monkeypatch, request_, message):
    from sequencer.errors import UserError
    monkeypatch.setattr(cpu_kernel.platform, 'machine', lambda: 'x86_64')
    monkeypatch.setattr(cpu_kernel, '_cpu_flags', lambda: {'avx2', 'fma', 'bmi2'})
    monkeypatch.setenv(cpu_kernel.ISA_ENV, request_)
    with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')):
        cpu_kernel._variants()


def test_build_kernel_command_refuses_a_bad_level_in_one_line():
    env = dict(os.environ, **{cpu_kernel.ISA_ENV: 'avx9'})
    r = subprocess.run([sys.executable, '-m', 'sequencer.cli', 'build-kernel'], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "sequencer build-kernel: error: SEQUENCER_CPU_ISA must be 'auto', 'x86_64_v4', 'x86_64_v3' or 'baseline', "
        "got 'avx9'"]


# the tests of the compiled kernels (recurrence, MLP, pre-norm) against the torch code they replace
KERNEL_TESTS = ['tests/test_fused.py::test_cpu_kernel_matches_torch_implementation_at_model_shapes',
                'tests/test_fused.py::test_whole_model_fused_equals_native',
                'tests/test_fused_mlp.py::test_fused_mlp_matches_timm',
                'tests/test_fused_mlp.py::test_kernel_gelu_and_derivative_match_torch',
                'tests/test_fused_residual.py::test_norm_backward_kernel_matches_layer_norm_backward_plus_residual',
                'tests/test_fused_residual.py::test_norm_forward_kernel_matches_layer_norm_and_adds_the_bias']


@pytest.mark.slow
@pytest.mark.skipif(cpu_kernel.cpu_level() != 'x86_64_v4', reason='needs an AVX-512 (x86-64-v4) processor')
def test_avx2_build_of_the_kernels_passes_the_kernel_tests():
    """On an AVX-512 processor, the kernels built for AVX2 (as they run on an AVX2-only processor) are built under
    their own name and pass the kernel tests."""
    if not cpu_kernel.enabled():
        pytest.skip(f'{cpu_kernel.ENV}=0')
    env = dict(os.environ, **{cpu_kernel.ISA_ENV: 'x86_64_v3'})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, '-m', 'sequencer.cli', 'build-kernel'], capture_output=True, text=True,
                       env=env, timeout=600, cwd=root)
    assert r.returncode == 0, r.stderr
    assert 'CPU LSTM kernel sequencer_lstm2d_x86_64_v3: ready' in r.stdout
    r = subprocess.run([sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', '-o', 'addopts=', *KERNEL_TESTS],
                       capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert r.returncode == 0, r.stdout[-3000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert ' passed' in summary and 'skipped' not in summary, r.stdout


ZEN = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: {family}
model\t\t: {model}
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 fma bmi2 avx512f avx512bw avx512_bf16{more}

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 99
model\t\t: 99
model name\t: another
"""


def test_processor_identity_tells_apart_processors_sold_under_one_name(tmp_path, monkeypatch):
    """A virtual machine's 'AMD EPYC' is Zen 4 (family 25) or Zen 5 (family 26): the family and model numbers are
    read from the first processor's block of /proc/cpuinfo (not the 'model name' line, which also starts with
    'model'), name the processor in benchmark results and key the autotune cache apart."""
    from sequencer.analysis.benchmark import environment
    from sequencer.fast import autotune
    seen = {}
    for family, model, more in ((25, 17, ''), (26, 2, ' avx512_vnni amx_tile')):
        info = tmp_path / f'cpuinfo-{family}'
        info.write_text(ZEN.format(family=family, model=model, more=more))
        monkeypatch.setattr(cpu_kernel, 'CPUINFO', str(info))
        monkeypatch.setattr(autotune, '_PROCESSOR', {})
        assert cpu_kernel.cpu_model_name() == 'AMD EPYC'
        assert cpu_kernel.cpu_description() == f'AMD EPYC (family {family}, model {model})'
        sig = cpu_kernel.cpu_signature()
        assert (sig['vendor'], sig['family'], sig['model']) == ('AuthenticAMD', family, model)
        assert sig['features'] == ['avx2', 'fma', 'avx512f'] + ['avx512_vnni'] * bool(more) + ['avx512_bf16'] + \
            ['amx_tile'] * bool(more)
        env = environment(torch.device('cpu'))
        assert (env['cpu'], env['cpu_family'], env['cpu_model_number']) == ('AMD EPYC', family, model)
        assert env['device_name'] == cpu_kernel.cpu_description()
        seen[family] = autotune.processor_id()
        assert seen[family].startswith(f'AMD EPYC (family {family}, model {model})')
    assert seen[25] != seen[26]

    # where /proc/cpuinfo has no such fields (other architectures) or cannot be read, nothing is made up
    bare = tmp_path / 'cpuinfo-bare'
    bare.write_text('processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\n')
    for path in (str(bare), str(tmp_path / 'missing')):
        monkeypatch.setattr(cpu_kernel, 'CPUINFO', path)
        assert cpu_kernel.cpu_signature() == {} and cpu_kernel.cpu_model_name() == ''
        assert '(family' not in cpu_kernel.cpu_description()
        assert 'cpu_family' not in environment(torch.device('cpu'))


def test_cpu_kernel_backward_gemms_run_in_the_autocast_dtype():
    """Under CPU bf16 autocast the compiled recurrence's input gradient and dW_ih are bf16 GEMMs (as a Linear
    layer's and nn.LSTM's are there, and the GPU path's), not float32 ones: every matrix product of the backward
    outside the kernel takes bf16 operands. Gradients come back in the parameters' and the input's dtypes, close
    to the native engine's under the same autocast."""
    from torch.utils._python_dispatch import TorchDispatchMode
    if not cpu_kernel.enabled():
        pytest.skip(f'{cpu_kernel.ENV}=0')
    assert cpu_kernel.load(raise_errors=True), cpu_kernel.error()

    class Products(TorchDispatchMode):   # the operand dtypes of every matrix product dispatched while active
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.mkldnn._linear_pointwise):
                self.dtypes.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor) and a.dim() == 2))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    m = RNN2D(16, 4, with_fc=False)
    x = torch.randn(2, 5, 6, 16)
    grads = {}
    for engine in ('native', 'fused'):
        set_engine(m, engine)
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = m(xi)
        products = Products()
        with products:
            y.float().sum().backward()
        grads[engine] = (xi.grad, {k: p.grad for k, p in m.named_parameters()})
        if engine == 'fused':
            assert len(products.dtypes) == 2, products.dtypes   # the input gradient and dW_ih
            assert all(set(d) == {torch.bfloat16} for d in products.dtypes), products.dtypes
    (dx_n, g_n), (dx_f, g_f) = grads['native'], grads['fused']
    assert dx_f.dtype == x.dtype
    torch.testing.assert_close(dx_f, dx_n, rtol=0, atol=3e-2 * dx_n.abs().max().item())
    for k, g in g_f.items():
        assert g.dtype == torch.float32, k
        torch.testing.assert_close(g, g_n[k], rtol=0, atol=3e-2 * g_n[k].abs().max().item(), msg=k)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_cpu_kernel_reads_and_writes_low_precision_gates_as_a_cast_would(dtype):
    """Under autocast the kernel reads the input projections in their low-precision dtype (``xin``) and writes the
    gate gradients in it (``dxp``): the same numbers as widening them to float32 first and rounding the float32
    gradients afterwards (Tensor.to), with the saved activations left intact and no float32 copies."""
    if not cpu_kernel.enabled():
        pytest.skip(f'{cpu_kernel.ENV}=0')
    assert cpu_kernel.load(raise_errors=True), cpu_kernel.error()
    ops = torch.ops.sequencer_lstm2d
    B, H, W, h, kinds = 2, 3, 5, 4, [0, 1, 2, 3]
    D, G = len(kinds), 4 * h
    gen = torch.Generator().manual_seed(0)
    xin = torch.randn(B * H * W, D * G, generator=gen).to(dtype)
    bias, whh = torch.randn(D * G, generator=gen), torch.randn(D, G, h, generator=gen) * 0.3
    gy = torch.randn(B * H * W, D * h, generator=gen)

    def forward(xp, low):
        y = torch.empty(B * H * W, D * h)
        cs = ops.forward(xp, bias, whh.transpose(1, 2).contiguous(), B, H, W, kinds, h, y, True, low)
        return y, cs, xp

    y32, cs32, act32 = forward(xin.float(), None)
    y16, cs16, act16 = forward(torch.empty(B * H * W, D * G), xin)
    # (cs has rows that directions shorter than the longest never write: compared through the backward below)
    assert torch.equal(y16, y32) and torch.equal(act16, act32)

    def backward(gates, cs, low):
        dwhh, db = torch.empty_like(whh), torch.empty(D * G)
        ops.backward(gy, gates, cs, whh, y32, B, H, W, kinds, h, dwhh, db, low)
        return dwhh, db

    gates32 = act32.clone()
    dwhh32, db32 = backward(gates32, cs32, None)                 # gate gradients in place over the activations
    dxp = torch.empty(act16.shape, dtype=dtype)
    dwhh16, db16 = backward(act16, cs16, dxp)
    assert torch.equal(dxp, gates32.to(dtype)) and torch.equal(act16, act32)   # activations untouched
    assert torch.equal(dwhh16, dwhh32) and torch.equal(db16, db32)

    with pytest.raises(RuntimeError, match='xin must be a contiguous bfloat16 or float16 CPU tensor'):
        forward(torch.empty(B * H * W, D * G), xin.float())
