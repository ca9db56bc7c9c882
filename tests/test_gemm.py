"""The fast engine's CPU GEMMs on MKL and oneDNN (``sequencer.fast.gemm``): equal results, and a measured choice."""
import argparse
import json
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sequencer
from sequencer.errors import UserError
from sequencer.fast import autotune, gemm
from sequencer.fast.modules import FastLinear, set_engine

from conftest import randomize

pytestmark = pytest.mark.skipif(not gemm.available(), reason='this PyTorch build has no oneDNN')


@pytest.fixture
def backend():
    """Force a backend for one test, and go back to 'auto' after it."""
    yield gemm.set_backend
    gemm.set_backend(None)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# (A, B) of A @ B in each layout the fast engine hands over, including one-row and non-contiguous operands
def _layouts(g):
    x, w, gy = torch.randn(37, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(37, 40, generator=g)
    return {
        'forward x @ W^T': (x, w.t()),
        'input_grad dY @ W': (gy, w),
        'weight_grad dY^T @ X': (gy.t(), x),
        'weight_grad of a strided dY': (torch.randn(37, 80, generator=g)[:, ::2].t(), x),
        'one row': (x[:1], w.t()),
        'strided rows': (torch.randn(37, 48, generator=g)[:, ::2], w.t()),
    }


@pytest.mark.parametrize('name', list(_layouts(torch.Generator().manual_seed(0))))
def test_mm_backends_agree_with_torch(backend, name):
    a, b = _layouts(torch.Generator().manual_seed(0))[name]
    ref = (a.double() @ b.double()).float()
    for be in gemm.BACKENDS:
        backend(be)
        for kind in gemm.KINDS:   # each kind's oneDNN op, on every layout (others fall back to the plain one)
            out = gemm.mm(a, b, kind)
            assert out.shape == ref.shape
            assert _rel(out, ref) < 1e-5, (be, kind)


def test_onednn_is_really_used(backend):
    """The oneDNN path runs oneDNN's inner product (seen by the profiler), the MKL path torch.mm."""
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    for be, kind, op in (('onednn', 'forward', 'mkldnn::_linear_pointwise'), ('mkl', 'forward', 'aten::mm'),
                         ('onednn', 'weight_grad', 'aten::mkldnn_linear_backward_weights')):
        backend(be)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            gemm.mm(torch.randn(64, 16).t(), a, kind) if kind == 'weight_grad' else gemm.mm(a, b, kind)
        names = {e.name for e in prof.events()}
        assert op in names, (be, kind, names)


@pytest.mark.parametrize('bias', [False, True])
def test_add_mm_in_place_only_on_mkl(backend, bias):
    g = torch.Generator().manual_seed(1)
    c, a, w = torch.randn(9, 5, generator=g), torch.randn(9, 7, generator=g), torch.randn(5, 7, generator=g)
    b = torch.randn(5, generator=g) if bias else None
    ref = c + a @ w.t() + (b if bias else 0)
    backend('mkl')
    c1 = c.clone()
    out = gemm.add_mm(c1, a, w.t(), b)
    assert _rel(out, ref) < 1e-6
    assert (out is c1) == (not bias)          # without a bias MKL accumulates onto c itself
    backend('onednn')
    c2 = c.clone()
    out = gemm.add_mm(c2, a, w.t(), b)
    assert out is not c2 and torch.equal(c2, c)   # oneDNN's post-op: c is read, not written
    assert _rel(out, ref) < 1e-6
    assert _rel(gemm.addmm(b, a, w.t()), a @ w.t() + (b if bias else 0)) < 1e-6


def test_linear_gradients_equal_f_linear(backend):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 12, generator=g, requires_grad=True)
    w = torch.randn(8, 12, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)
    gy = torch.randn(2, 3, 5, 8, generator=g)
    ref = F.linear(x.double(), w.double(), b.double())
    ref_grads = torch.autograd.grad(ref, (x, w, b), gy.double())
    for be in gemm.BACKENDS:
        backend(be)
        y = gemm.linear(x, w, b)
        grads = torch.autograd.grad(y, (x, w, b), gy)
        assert _rel(y, ref.float()) < 1e-6
        for got, want in zip(grads, ref_grads):
            assert got.shape == want.shape and _rel(got, want.float()) < 1e-5, be


@pytest.mark.parametrize('train', [False, True])
def test_whole_model_same_on_both_backends(backend, train):
    """Sequencer2D with the fused engine (input projections, fused MLPs, fc with the residual, patch GEMMs, head):
    logits and every gradient with oneDNN's GEMMs equal MKL's to float32 rounding, in eval mode (the residual
    accumulated into the branches' GEMMs) and in training."""
    torch.manual_seed(0)
    model = sequencer.create_model('sequencer2d_s', layers=[1, 1, 1, 1], num_classes=10, rnn_engine='fused')
    randomize(model, scale=0.1)
    model.train(train)
    x = torch.randn(2, 3, 64, 48)
    results = {}
    for be in gemm.BACKENDS:
        backend(be)
        xi = x.clone().requires_grad_()
        y = model(xi)
        grads = torch.autograd.grad(y.square().sum(), [xi] + list(model.parameters()))
        results[be] = (y.detach(), grads)
    (y0, g0), (y1, g1) = results['mkl'], results['onednn']
    assert _rel(y1, y0) < 1e-5
    assert max(_rel(a, b) for a, b in zip(g1, g0)) < 1e-4


def test_every_linear_is_routed():
    model = sequencer.create_model('sequencer2d_s', layers=[1, 1, 1, 1], num_classes=10, rnn_engine='fused')
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is FastLinear for m in linears)
    keys = list(model.state_dict())
    set_engine(model, 'native')
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert list(model.state_dict()) == keys


def _timer(fast):
    """An injected timer: ``fast`` takes 1 ms per call, the other backend 3 ms."""
    calls = []

    def timer(name, fn):
        calls.append(name)
        return 0.001 if name == fast else 0.003
    return timer, calls


@pytest.mark.parametrize('fast', gemm.BACKENDS)
def test_choice_is_measured_then_cached(monkeypatch, fast):
    monkeypatch.setenv('SEQUENCER_AUTOTUNE', '1')
    autotune.clear_cache()
    timer, calls = _timer(fast)
    monkeypatch.setattr(autotune, 'time_call', lambda name, fn, device='cpu': timer(name, fn))
    assert gemm.backend('forward') == fast
    assert set(calls) == set(gemm.BACKENDS)
    # cached on disk per kind, with the times; later calls and other kinds measure only what is new
    entries = json.loads(autotune.cache_path().read_text())['entries']
    (section,) = entries.values()
    key = f"gemm forward float32 threads={torch.get_num_threads()}"
    assert section[key]['choice'] == fast and set(section[key]['ms']) == set(gemm.BACKENDS)
    n = len(calls)
    assert gemm.backend('forward') == fast and len(calls) == n
    assert gemm.backend('weight_grad') == fast and len(calls) > n
    assert 'forward: ' + fast in gemm.describe()
    # a new process reads the file: nothing is timed
    autotune._memory.clear()
    monkeypatch.setattr(autotune, 'time_call', lambda name, fn, device='cpu': pytest.fail('timed again'))
    assert gemm.backend('forward') == fast


def test_switches(monkeypatch, backend):
    monkeypatch.setattr(autotune, 'time_call', lambda name, fn, device='cpu': pytest.fail('timed'))
    assert gemm.backend('forward') == 'mkl'                # SEQUENCER_AUTOTUNE=0 (the tests' default): MKL
    monkeypatch.setenv('SEQUENCER_AUTOTUNE', '1')
    monkeypatch.setenv('SEQUENCER_GEMM', 'onednn')
    assert gemm.backend('input_grad') == 'onednn' and gemm.describe() == 'onednn (set)'
    backend('mkl')                                         # set_backend wins over the variable
    assert gemm.backend('input_grad') == 'mkl'
    backend(None)
    monkeypatch.setenv('SEQUENCER_GEMM', 'blas')
    with pytest.raises(UserError, match='SEQUENCER_GEMM'):
        gemm.backend('forward')
    with pytest.raises(ValueError, match='auto'):
        gemm.set_backend('openblas')


def test_nested_measurement_keeps_the_outer_flag(monkeypatch):
    """A choice made inside another's measurement (a layer's warm-up asks for the GEMM backend) leaves the outer
    one still measuring."""
    monkeypatch.setenv('SEQUENCER_AUTOTUNE', '1')
    seen = []

    def outer_step():
        autotune.choose('inner', {'a': lambda: None}, timer=lambda n, fn: 0.001)
        seen.append(autotune.measuring())

    autotune.choose('outer', {'x': outer_step}, timer=lambda n, fn: (fn(), 0.001)[1], steps=1)
    assert seen == [True] and not autotune.measuring()


def test_compiled_graphs_use_torch_ops(backend):
    backend('onednn')
    layer = FastLinear(6, 4)

    @torch.compile(backend='eager', fullgraph=True)
    def f(x):
        return layer(x)

    x = torch.randn(3, 6)
    assert torch.allclose(f(x), F.linear(x, layer.weight, layer.bias), atol=1e-6)


def test_double_backward_through_onednn_linear(backend):
    """A gradient penalty (create_graph) differentiates the backward's GEMMs: they then run as PyTorch's own ops."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g, requires_grad=True)
    w = torch.randn(4, 5, generator=g, requires_grad=True)
    results = []
    for be in ('mkl', 'onednn'):
        backend(be)
        y = gemm.linear(x, w)
        gx, = torch.autograd.grad(y.sin().sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), w)[0])
    ref_y = F.linear(x, w)
    ref_gx, = torch.autograd.grad(ref_y.sin().sum(), x, create_graph=True)
    ref = torch.autograd.grad(ref_gx.square().sum(), w)[0]
    for got in results:
        assert _rel(got, ref) < 1e-5


# ---- weights packed for inference --------------------------------------------------------------------------------

def _packed_model():
    torch.manual_seed(0)
    model = sequencer.create_model('sequencer2d_s', layers=[1, 1, 1, 1], num_classes=10, rnn_engine='fused')
    return randomize(model, scale=0.1).eval()


def test_packed_weights_give_the_same_outputs_and_follow_weight_changes(packing):
    """Every forward GEMM of the model (input projections, fused MLPs, fc with the residual, patch GEMMs, head)
    with packed weights gives the unpacked outputs; a weight changed in place or replaced is packed again, and
    load_state_dict's new weights are used. A change through .data is not seen until clear_packed()."""
    model = _packed_model()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        gemm.set_packing(False)
        plain = model(x)
        gemm.set_packing(True)
        packed = model(x)
        n = gemm.packed_count()
        # the head, the stem, the 1x1 downsamplings (the 2x2 one multiplies by a reordered copy of its weight,
        # made at each call: not packed), and per block the input projection, fc1, fc2 and fc
        assert n == 1 + 1 + 2 + 4 * 4, n
        assert torch.equal(packed, plain)
        assert torch.equal(model(x), plain) and gemm.packed_count() == n     # reused, not packed again

        def unpacked():
            gemm.set_packing(False)
            try:
                return model(x)
            finally:
                gemm.set_packing(True)

        block = model.stages[2].blocks[0]
        for p in block.parameters():                      # in place (what optimizers and EMA do)
            p.mul_(1.5)
        changed = unpacked()
        assert _rel(changed, plain) > 1e-3
        assert torch.equal(model(x), changed) and gemm.packed_count() == n
        model.head.fc.weight = nn.Parameter(model.head.fc.weight * 2)   # replaced
        assert torch.equal(model(x), unpacked())
        state = {k: v * 0.5 for k, v in model.state_dict().items()}
        model.load_state_dict(state)                      # copied in under no_grad: versions move
        assert torch.equal(model(x), unpacked())
        before = model(x)
        block.mlp_channels.fc1.weight.data.mul_(3.0)      # .data bypasses the version counter ...
        assert torch.equal(model(x), before)
        gemm.clear_packed()                               # ... until the packed copies are forgotten
        assert torch.equal(model(x), unpacked()) and not torch.equal(unpacked(), before)
        before = model(x)                                 # the same for the recurrence's stacked input weights
        block.rnn_tokens.rnn_v.weight_ih_l0.data.mul_(3.0)
        assert torch.equal(model(x), before)
        gemm.clear_packed()
        assert torch.equal(model(x), unpacked()) and not torch.equal(unpacked(), before)


def test_packing_only_outside_autograd_and_never_for_activations(packing):
    """Training (and any forward that records a graph) uses the weights as they are; a GEMM of two activations
    (a non-Parameter operand) is never packed; at most MAX_PACKED_ROWS copies per weight."""
    model = _packed_model().train()
    model(torch.randn(2, 3, 64, 48)).sum().backward()
    assert gemm.packed_count() == 0
    a, b = torch.randn(16, 8), torch.randn(8, 4)
    with torch.no_grad():
        assert torch.allclose(gemm.mm(a, b, 'forward'), a @ b, atol=1e-5)
        assert gemm.packed_count() == 0
        lin = nn.Linear(8, 4)
        for rows in range(1, gemm.MAX_PACKED_ROWS + 3):
            x = torch.randn(rows, 8)
            assert torch.allclose(gemm.linear(x, lin.weight, lin.bias), lin(x), atol=1e-5)
        assert gemm.packed_count() == gemm.MAX_PACKED_ROWS


def test_packing_under_inference_mode(packing):
    """Under torch.inference_mode the weights are packed as under no_grad (the recurrence's stacked weights
    included) with the same outputs; a model made under inference_mode (inference tensors: no version counter)
    runs unpacked rather than failing."""
    model = _packed_model()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        ref = model(x)
    n = gemm.packed_count()
    gemm.clear_packed()
    with torch.inference_mode():
        assert torch.equal(model(x), ref) and gemm.packed_count() == n
        assert torch.equal(model(x), ref) and gemm.packed_count() == n
    gemm.clear_packed()
    state = model.state_dict()
    with torch.inference_mode():
        made = sequencer.create_model('sequencer2d_s', layers=[1, 1, 1, 1], num_classes=10,
                                      rnn_engine='fused').eval()
        made.load_state_dict(state)
        assert torch.equal(made(x), ref)
    assert gemm.packed_count() == 0


def test_packed_inference_is_a_choice_of_its_own(monkeypatch):
    """With packing on, a forward GEMM of inference follows its own measured choice, MKL against oneDNN with packed
    weights ('packed_forward'), not the unpacked forward's: here MKL wins unpacked and packed oneDNN wins packed.
    Training and packing off keep the unpacked choice; the layers' autotune keys name the backend that ran."""
    monkeypatch.setenv('SEQUENCER_AUTOTUNE', '1')
    autotune.clear_cache()
    gemm.clear_packed()
    timer, calls = _timer('mkl')
    monkeypatch.setattr(autotune, 'time_call', lambda name, fn, device='cpu': timer(name, fn))
    for kind in gemm.KINDS:
        assert gemm.backend(kind) == 'mkl'
    timer, calls = _timer('onednn')
    monkeypatch.setattr(autotune, 'time_call', lambda name, fn, device='cpu': timer(name, fn))
    model = sequencer.create_model('sequencer2d_s', layers=[1, 1, 1, 1], num_classes=10, rnn_engine='auto')
    model = randomize(model, scale=0.1).eval()
    x = torch.randn(2, 3, 64, 48)
    try:
        with torch.no_grad():
            plain = model(x)                                # packing off: the forward choice, MKL
            assert gemm.packed_count() == 0 and not set(calls) & set(gemm.BACKENDS)
            gemm.set_packing(True)
            assert gemm.forward_kind(True) == gemm.PACKED and gemm.forward_kind(False) == 'forward'
            packed = model(x)                               # measured now: packed oneDNN
            assert set(calls) >= set(gemm.BACKENDS)
            assert gemm.backend(gemm.PACKED) == 'onednn' and gemm.packed_count() > 0
            assert _rel(packed, plain) < 1e-5
        assert gemm.forward_kind(True) == 'forward'         # grad mode on: nothing is packed, the forward choice
        key = f"gemm packed_forward float32 threads={torch.get_num_threads()}"
        entry = json.loads(autotune.cache_path().read_text())['entries']
        (section,) = entry.values()
        assert section[key]['choice'] == 'onednn' and set(section[key]['ms']) == set(gemm.BACKENDS)
        assert 'packed_forward: onednn' in gemm.describe() and 'forward: mkl' in gemm.describe()
        infer = [k for k in autotune.choices() if ' infer ' in k]
        assert infer and any(k.endswith('gemm=onednn') for k in infer) and any(k.endswith('gemm=mkl') for k in infer)
    finally:
        gemm.set_packing(None)
        gemm.clear_packed()


def test_packed_measurement_times_packed_weights(monkeypatch):
    """The 'packed_forward' measurement (real timer) runs oneDNN on weights packed before the timing: no reorder of
    a weight inside a timed step."""
    monkeypatch.setenv('SEQUENCER_AUTOTUNE', '1')
    autotune.clear_cache()
    reorders, timing = [], []
    real = torch.ops.mkldnn._reorder_linear_weight

    def reorder(*a):
        reorders.append(bool(timing))
        return real(*a)

    monkeypatch.setattr(gemm.torch.ops.mkldnn, '_reorder_linear_weight', reorder)
    real_time = autotune.time_call

    def timed(name, fn, device='cpu'):
        timing.append(name)
        try:
            return real_time(name, fn, device)
        finally:
            timing.clear()

    monkeypatch.setattr(autotune, 'time_call', timed)
    assert gemm.backend(gemm.PACKED) in gemm.BACKENDS
    assert reorders == [False] * len(gemm._SHAPES)


def test_packing_switches(monkeypatch):
    gemm.set_packing(None)
    monkeypatch.delenv('SEQUENCER_PACK_WEIGHTS', raising=False)
    assert not gemm.packing()
    monkeypatch.setenv('SEQUENCER_PACK_WEIGHTS', '1')
    assert gemm.packing() and gemm.describe().endswith('; oneDNN weights packed')
    with gemm.packing_on():
        gemm.set_packing(False)
        assert not gemm.packing()
    assert gemm.packing()                                 # the block restored the environment's setting
    monkeypatch.setenv('SEQUENCER_PACK_WEIGHTS', 'maybe')
    with pytest.raises(UserError, match='SEQUENCER_PACK_WEIGHTS'):
        gemm.packing()


def test_validate_and_predict_pack_weights(monkeypatch):
    """`sequencer validate` and `sequencer predict` run inference on weights loaded once: packing is on while they
    run, and off again after them."""
    import importlib
    validate = importlib.import_module('sequencer.engine.validate')
    predict = importlib.import_module('sequencer.export.predict')   # (the package exports a function of that name)
    seen = []
    monkeypatch.setattr(validate, 'validate', lambda args: seen.append(('validate', gemm.packing())) or {})
    assert validate.main(['some/folder']) == 0
    loaded = types.SimpleNamespace(model=None, data_config=lambda img_size=None: {})
    monkeypatch.setattr(predict, 'list_images', lambda paths: ['a.jpg'])
    monkeypatch.setattr(predict, 'resolve_device', lambda d: torch.device('cpu'))
    monkeypatch.setattr(predict, 'model_from_args', lambda args, device, log: loaded)
    monkeypatch.setattr(predict, 'class_names', lambda loaded, class_map: [])
    monkeypatch.setattr(predict, 'predict', lambda *a, **k: seen.append(('predict', gemm.packing())) or [])
    args = argparse.Namespace(images=['a.jpg'], device='cpu', class_map=None, topk=5, batch_size=1, img_size=None,
                              json=True)
    assert predict.run(args) == 0
    assert seen == [('validate', True), ('predict', True)] and not gemm.packing()
