"""The fast modules' per-call path: the fused autograd Functions run without autograd's bookkeeping where nothing
can be recorded (``runtime.apply``), and each call reads the recurrences' parameters of the moment through a
table kept per layer (``FastRNN2D._lstm_params``)."""
import copy

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.nn.utils import parametrize

import sequencer
from sequencer.fast import FastRNN2D, gemm, lstm2d, ops, runtime


def _model(seed=0):
    torch.manual_seed(seed)
    model = sequencer.create_model('sequencer2d_s', layers=[1, 1, 1, 1], num_classes=10, rnn_engine='native')
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return sequencer.set_engine(model, 'fused').eval()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, FastRNN2D)]


@pytest.fixture
def applied(monkeypatch):
    """Counts the calls that go through ``Function.apply`` of the fused Functions."""
    counts = {}
    for fn in (lstm2d._FusedLSTM2D, ops._FusedMlp, ops._LinearResidual, gemm._Linear):
        real = fn.apply

        def counted(*args, _real=real, _name=fn.__name__):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*args)
        monkeypatch.setattr(fn, 'apply', counted)
    return counts


def test_without_a_graph_the_functions_run_directly_with_the_same_outputs(applied):
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    with torch.enable_grad():
        recorded = model(x)
    assert applied.get('_FusedLSTM2D') == 4 and applied.get('_FusedMlp') == 4 and recorded.grad_fn is not None
    applied.clear()
    with torch.no_grad():
        direct = model(x)
    with torch.inference_mode():
        inference = model(x)
    assert not applied, applied                      # nothing went through Function.apply ...
    assert direct.grad_fn is None and not direct.requires_grad
    torch.testing.assert_close(direct, recorded.detach(), rtol=0, atol=0)    # ... and nothing changed
    torch.testing.assert_close(inference, recorded.detach(), rtol=0, atol=0)


def test_inputs_that_require_gradients_under_no_grad_give_no_graph(applied):
    model = _model()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    with torch.no_grad():
        y = model(x)
    assert not applied and y.grad_fn is None and x.grad is None
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize('grad', [False, True])
def test_forward_mode_ad_runs_the_plain_ops_and_gives_native_tangents(applied, grad):
    """Inside a ``forward_ad.dual_level`` the fast modules run the plain ops (the fused functions and kernels have
    no forward-mode formulas: their tangents were dropped silently), so the tangents are the paper's model's
    (oneDNN's LSTM has no forward-mode formula either: PyTorch's own LSTM runs here, for both)."""
    fused = _model()
    native = sequencer.set_engine(copy.deepcopy(fused), 'native')
    x, t = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    tangents = {}
    for name, model in (('native', native), ('fused', fused)):
        with torch.set_grad_enabled(grad), torch.backends.mkldnn.flags(enabled=False), forward_ad.dual_level():
            tangents[name] = forward_ad.unpack_dual(model(forward_ad.make_dual(x, t))).tangent
    assert not applied, applied
    assert tangents['fused'] is not None
    torch.testing.assert_close(tangents['fused'], tangents['native'], rtol=1e-5, atol=1e-5)
    assert runtime._forward_ad_level() == -1 and not runtime.functorch_active()


def test_the_residual_accumulated_in_place_bumps_its_version(monkeypatch):
    """Without ``Function.apply`` (and its ``mark_dirty``), the in-place accumulation onto the residual (MKL's
    ``addmm_``) is still an in-place op on it, as autograd's version checks need."""
    monkeypatch.setattr(gemm, '_forced', {'backend': 'mkl', 'packing': None})
    layer = _layers(_model())[1]
    x = torch.randn(1, 8, 8, layer.input_size)
    with torch.no_grad():
        residual = torch.randn(1, 8, 8, layer.input_size) + layer.fc.bias
        expected = residual + layer.fc(lstm2d.fused_rnn2d(layer, x)) - layer.fc.bias
        before = residual._version
        out = ops.linear_residual(layer.fc, lstm2d.fused_rnn2d(layer, x), residual, bias_in_residual=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.data_ptr() == residual.data_ptr() and residual._version > before


def test_each_call_reads_the_parameters_of_the_moment():
    """Replaced parameters, a replaced recurrence and a parametrized weight are what the next call reads."""
    model = _model()
    layer = _layers(model)[0]
    x = torch.randn(1, 6, 6, layer.input_size)

    def out():
        with torch.no_grad():
            return lstm2d.fused_rnn2d(layer, x)

    first = out()
    kinds, params = layer._lstm_params()
    assert len(kinds) == 4 and len(params) == 16

    new = nn.Parameter(layer.rnn_v.weight_ih_l0.detach() * 2)
    layer.rnn_v.weight_ih_l0 = new
    assert layer._lstm_params()[1][0] is new
    replaced = out()
    assert not torch.equal(replaced, first)

    lstm = copy.deepcopy(layer.rnn_h)
    with torch.no_grad():
        lstm.weight_hh_l0.mul_(0.5)
    layer.rnn_h = lstm
    assert layer._lstm_params()[1][9] is lstm.weight_hh_l0
    assert not torch.equal(out(), replaced)

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    expected_layer = copy.deepcopy(layer)
    with torch.no_grad():
        expected_layer.rnn_h.weight_hh_l0.mul_(2)
        expected = lstm2d.fused_rnn2d(expected_layer, x)
    unparametrized = out()
    parametrize.register_parametrization(layer.rnn_h, 'weight_hh_l0', Double())
    torch.testing.assert_close(out(), expected, rtol=1e-6, atol=1e-6)
    parametrize.remove_parametrizations(layer.rnn_h, 'weight_hh_l0', leave_parametrized=False)
    torch.testing.assert_close(out(), unparametrized, rtol=0, atol=0)


def test_a_unidirectional_layer_and_a_changed_direction_rebuild_the_table():
    layer = sequencer.set_engine(nn.Sequential(sequencer.models.blocks.RNN2D(8, 3, bidirectional=False)),
                                 'fused')[0]
    kinds, params = layer._lstm_params()
    assert kinds == ((True, False), (False, False)) and len(params) == 8
    layer.rnn_h = nn.LSTM(8, 3, batch_first=True, bidirectional=True)
    kinds, params = layer._lstm_params()
    assert kinds == ((True, False), (False, False), (False, True)) and len(params) == 12
    assert params[8] is layer.rnn_h.weight_ih_l0_reverse


def test_a_block_decides_each_branch_once_per_call(monkeypatch):
    """The block asks each branch once (``residual_bias``) and then runs the path that answer chose
    (``forward_into``): the recurrence's engine and the MLP's fused path are not decided twice."""
    from sequencer.fast import FastMlp
    model = _model()
    calls = {'engine_decision': 0, 'fusable': 0}
    real_decision, real_fusable = FastRNN2D.engine_decision, FastMlp.fusable

    def decision(self, *args, **kwargs):
        calls['engine_decision'] += 1
        return real_decision(self, *args, **kwargs)

    def fusable(self, x):
        calls['fusable'] += 1
        return real_fusable(self, x)

    monkeypatch.setattr(FastRNN2D, 'engine_decision', decision)
    monkeypatch.setattr(FastMlp, 'fusable', fusable)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert calls == {'engine_decision': 4, 'fusable': 4}, calls   # 4 blocks
    native = sequencer.set_engine(copy.deepcopy(model), 'native')
    with torch.no_grad():
        torch.testing.assert_close(out, native(x), rtol=1e-5, atol=1e-5)
