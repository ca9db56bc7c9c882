"""The fast engine under less common but legitimate uses, against the plain model ('native') as the oracle:
double backward, hooks on the submodules a fused path skips, partly frozen models with measured choices that
differ by grad mode, and packed weights after a storage replacement."""
import copy
import json

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook

import sequencer
from sequencer.fast import autotune, cpu_kernel_disabled, gemm


def _model(engine, seed=0, scale=0.1):
    """A one-block-per-stage Sequencer2D-S with every weight random (the default init zeroes the head)."""
    torch.manual_seed(seed)
    model = sequencer.create_model('sequencer2d_s', layers=[1, 1, 1, 1], num_classes=10, rnn_engine='native')
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)
    sequencer.set_engine(model, engine)
    return model


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _penalty_grads(model, x, kind):
    """d/d(params, x) of a penalty on first-order gradients taken with create_graph: of the input gradient (R1,
    WGAN-GP) or of the parameter gradients (gradient-norm regularisation)."""
    xi = x.clone().requires_grad_()
    out = model(xi).square().sum()
    params = list(model.parameters())
    firsts = torch.autograd.grad(out, [xi] if kind == 'input' else params, create_graph=True)
    penalty = sum(g.square().sum() for g in firsts)
    return torch.autograd.grad(penalty, params + [xi], allow_unused=True)


@pytest.mark.parametrize('path', ['kernel', 'torch'])
@pytest.mark.parametrize('kind', ['input', 'params'])
def test_double_backward_matches_the_plain_model(path, kind):
    """A backward with create_graph through the fused recurrence, MLP, residual GEMMs and norms differentiates a
    plain recomputation: second-order gradients equal nn.LSTM's (they were silently wrong)."""
    x = torch.randn(2, 3, 32, 32)
    ref = _penalty_grads(_model('native').train(), x, kind)
    fused = _model('fused').train()
    if path == 'torch':
        with cpu_kernel_disabled():
            got = _penalty_grads(fused, x, kind)
    else:
        got = _penalty_grads(fused, x, kind)
    assert [g is None for g in got] == [r is None for r in ref]
    worst = max(_rel(g, r) for g, r in zip(got, ref) if r is not None)
    assert worst < 1e-4, worst


@pytest.mark.parametrize('engine', ['fused', 'auto'])
def test_hooks_on_skipped_submodules_make_the_plain_forward_run(engine):
    """Hooks on a BiLSTM2D's nn.LSTM modules, global module hooks, and hooks on the MLP's dropout / norm
    submodules are called and take effect: those layers run their plain forward (they were skipped)."""
    native, model = _model('native').eval(), _model(engine).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = native(x)
        assert _rel(model(x), ref) < 1e-5
    for m in (native, model):
        block = m.stages[1].blocks[0]
        block.rnn_tokens.rnn_v.register_forward_pre_hook(lambda mod, args: (args[0] * 0,))
        block.mlp_channels.drop1.register_forward_hook(lambda mod, inp, out: out * 0.5)
    lstm_calls = []
    handle = register_module_forward_hook(
        lambda mod, inp, out: lstm_calls.append(1) if isinstance(mod, torch.nn.LSTM) else None)
    try:
        with torch.no_grad():
            hooked_ref = native(x)
            n_native = len(lstm_calls)
            hooked = model(x)
    finally:
        handle.remove()
    assert _rel(hooked_ref, ref) > 1e-2                       # the hooks change the output ...
    assert _rel(hooked, hooked_ref) < 1e-5                    # ... of the fast model in the same way
    assert len(lstm_calls) == 2 * n_native                    # and the global hook saw every nn.LSTM call


def test_partly_frozen_block_with_choices_that_differ_by_grad_mode(monkeypatch):
    """A block whose input needs no gradient but whose pre-norm does (stem and recurrences frozen), with 'auto'
    having measured the fused engine for inference and nn.LSTM for training: the block asks the recurrence about
    its real input, norm(x), and trains (it raised 'bias_in_residual needs the fused engine'); gradients equal
    the plain model's."""
    monkeypatch.setenv('SEQUENCER_AUTOTUNE', '1')
    autotune.clear_cache()
    x = torch.randn(1, 3, 64, 64)

    def frozen(engine):
        m = _model(engine)
        for n, p in m.named_parameters():
            if n.startswith('stem') or '.rnn_v.' in n or '.rnn_h.' in n:
                p.requires_grad_(False)
        return m

    m = frozen('auto')
    m(x).sum().backward()
    with torch.no_grad():
        m(x)
    path = autotune.cache_path()
    data = json.loads(path.read_text())
    layer_keys = 0
    for section in data['entries'].values():
        for key, entry in section.items():
            if key.startswith('cpu '):   # a layer's choice (not a GEMM's)
                entry['choice'] = 'fused' if ' infer ' in key else 'native'
                layer_keys += 1
    assert layer_keys >= 2
    path.write_text(json.dumps(data))
    autotune._memory.clear()          # as a new process reading that cache
    m, ref = frozen('auto'), frozen('native')
    m(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        if p.requires_grad:
            assert _rel(p.grad, q.grad) < 1e-4, n


@pytest.mark.skipif(not gemm.available(), reason='this PyTorch build has no oneDNN')
def test_packed_weights_follow_a_new_storage_at_the_old_address(packing):
    """A weight whose storage is replaced through .data (as model.half().float() does) by one at the same address
    with the same version counter is packed again: the packed copy follows the storage, not the address."""
    model = _model('fused').eval()
    x = torch.randn(1, 3, 64, 64)
    w = model.head.fc.weight
    with torch.no_grad():
        model(x)                                              # packs the head
    before = gemm.state(w)
    values = w.detach().numpy()                               # the same memory, seen by numpy ...
    w.data = torch.from_numpy(values)                         # ... as a new storage at the same address
    values *= 2.0                                             # (changed where no version counter sees it)
    after = gemm.state(w)
    assert after[1:] == before[1:] and after != before        # same address and version, another storage
    with torch.no_grad():
        got = model(x)
        gemm.set_packing(False)
        want = model(x)
    assert torch.equal(got, want)
    gemm.set_packing(True)
    for _ in range(3):                                        # and the round trip itself stays correct
        model.half().float()
        native = copy.deepcopy(model)
        sequencer.set_engine(native, 'native')
        with torch.no_grad():
            assert _rel(model(x), native(x)) < 1e-5


@pytest.mark.parametrize('backend', ['mkl', 'onednn'])
def test_batched_gradients_match_the_plain_model(backend):
    """Batched gradients (is_grads_batched, as jacobian / hessian with vectorize=True use) run the plain ops in
    each fused backward: the compiled kernels and oneDNN's ops have no batching rule (they raised)."""
    x = torch.randn(1, 3, 32, 32)
    ref = torch.autograd.functional.jacobian(_model('native').train(), x, vectorize=True)
    gemm.set_backend(backend)
    try:
        fused = _model('fused').train()
        got = torch.autograd.functional.jacobian(fused, x, vectorize=True)
        xi = x.clone().requires_grad_()
        out = fused(xi)
        eye = torch.eye(out.shape[1]).unsqueeze(1)                         # one output class per batched row
        (batched,) = torch.autograd.grad(out, xi, eye, is_grads_batched=True)
    finally:
        gemm.set_backend(None)
    assert _rel(got, ref) < 1e-4
    assert _rel(batched.reshape(ref.shape), ref) < 1e-4


def test_compiled_graph_reads_parameters_replaced_before_compiling():
    """torch.compile of a fast model whose LSTM parameters were replaced (load_state_dict(assign=True), a
    meta-device load) before any eager call uses the new parameters and gives them gradients (it used the
    ones held at set_engine: wrong outputs, no LSTM gradients)."""
    ref = _model('native', seed=1)
    fast = _model('auto', seed=2)
    fast.load_state_dict(ref.state_dict(), assign=True)
    x = torch.randn(2, 3, 32, 32)
    y = torch.compile(fast, backend='eager')(x)
    assert _rel(y, ref(x)) < 1e-5
    y.square().sum().backward()
    assert fast.stages[0].blocks[0].rnn_tokens.rnn_v.weight_ih_l0.grad is not None


def test_non_strict_export_holds_the_plain_ops():
    """torch.export (non-strict, its default) of a fast model captures nn.LSTM's ops, not the fused engine's
    custom ops: the exported program runs with gradients on and equals the plain model."""
    ref = _model('native')
    fast = _model('auto')
    x = torch.randn(2, 3, 32, 32)
    fast(x)                                                                 # an eager call first
    program = torch.export.export(fast, (x,))
    assert 'sequencer_' not in program.graph_module.code
    assert _rel(program.module()(x), ref(x)) < 1e-6
