"""The LSTM parameters of a fast BiLSTM2D as views of stacked buffers (``lstm2d.flatten_weights``): CPU inference
reads the stacked weights where they are, and every way a parameter can change is still seen, against the plain
model ('native') and against the copies the fused engine stacks otherwise."""
import copy
import io

import pytest
import torch
from safetensors.torch import load, save

import sequencer
from sequencer.fast import FastRNN2D, lstm2d


def _model(engine='fused', seed=0):
    torch.manual_seed(seed)
    model = sequencer.create_model('sequencer2d_s', layers=[1, 1, 1, 1], num_classes=10, rnn_engine='native')
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return sequencer.set_engine(model, engine).eval()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, FastRNN2D)]


def _flat(layer):
    return lstm2d.flat_weights(layer._lstm_params()[1])


def _plain(model):
    """The paper's model with ``model``'s weights (its own copies)."""
    plain = sequencer.create_model('sequencer2d_s', layers=[1, 1, 1, 1], num_classes=10, rnn_engine='native')
    plain.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    return plain.eval()


def _stacked_output(model, x):
    """``model(x)`` with the flat buffers forgotten: the fused engine stacks copies of the weights instead."""
    saved = dict(lstm2d._flat.items())
    lstm2d._flat.clear()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for k, v in saved.items():
            lstm2d._flat[k] = v


def test_parameters_become_views_of_one_buffer_per_kind():
    model = _model()
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    sequencer.set_engine(model, 'fused')   # again: nothing moves
    for layer in _layers(model):
        kinds, params = layer._lstm_params()
        flat = _flat(layer)
        assert flat is not None
        D, G = len(kinds), params[0].shape[0]
        assert flat.w_ih.shape == (D * G, params[0].shape[1]) and flat.w_hh.shape == (D, G, G // 4)
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh = params[4 * d:4 * d + 4]
            assert w_ih.untyped_storage().data_ptr() == flat.w_ih.untyped_storage().data_ptr()
            assert torch.equal(w_ih, flat.w_ih[d * G:(d + 1) * G]) and torch.equal(w_hh, flat.w_hh[d])
            assert torch.equal(b_ih, flat.b_ih[d * G:(d + 1) * G]) and torch.equal(b_hh, flat.b_hh[d * G:(d + 1) * G])
            assert w_ih.is_contiguous() and w_hh.is_contiguous()
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, (p, values) in before.items():
        assert after[name] is p and torch.equal(p, values)   # the same Parameter objects and values


def test_inference_reads_the_buffers_and_matches_the_stacked_copies_and_native():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        ref = _plain(model)(x)
    assert torch.equal(out, _stacked_output(model, x))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_in_place_writes_are_seen_even_through_data():
    model = _model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
    layer = _layers(model)[2]
    params = layer._lstm_params()[1]
    params[4].data.mul_(1.5)          # no version counter moves: a cache would miss it; the buffer does not
    with torch.no_grad():
        params[5].add_(0.01)
        params[2].data.fill_(0.2)
    assert _flat(layer) is not None
    with torch.no_grad():
        out = model(x)
        ref = _plain(model)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(out, _stacked_output(model, x))


def test_replaced_parameters_fall_back_to_stacking_and_load_state_dict_keeps_the_views():
    model = _model()
    donor = _model(seed=1)
    x = torch.randn(1, 3, 64, 64)
    layer = _layers(model)[1]
    model.load_state_dict(donor.state_dict())             # copies into the views
    assert _flat(layer) is not None
    with torch.no_grad():
        torch.testing.assert_close(model(x), donor(x), rtol=1e-4, atol=1e-5)
    params = layer._lstm_params()[1]
    params[0].data = params[0].data.clone() * 2           # the first W_ih now lives elsewhere
    assert _flat(layer) is None
    model.load_state_dict(donor.state_dict(), assign=True)   # new Parameter objects
    assert _flat(layer) is None
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, _plain(model)(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out, donor(x), rtol=1e-4, atol=1e-5)
    sequencer.set_engine(model, 'fused')                  # flattened again
    assert _flat(layer) is not None
    with torch.no_grad():
        torch.testing.assert_close(model(x), donor(x), rtol=1e-4, atol=1e-5)


def test_casts_and_moves_flatten_again_and_shared_memory_is_kept():
    model = _model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    model.double()
    assert all(_flat(layer) is None for layer in _layers(model))   # float64: nothing to flatten
    assert all(lstm2d._flat.get(layer._lstm_params()[1][0]) is None for layer in _layers(model))   # buffers let go
    model.float()
    assert all(_flat(layer) is not None for layer in _layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    model.share_memory()
    assert all(p.is_shared() for p in model.parameters())


def test_shared_memory_parameters_are_not_moved():
    model = _model('native').share_memory()
    sequencer.set_engine(model, 'fused')
    assert all(p.is_shared() for p in model.parameters())
    assert all(_flat(layer) is None for layer in _layers(model))


def test_files_and_copies_of_a_flattened_model():
    model = _model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    state = model.state_dict()
    loaded = load(save({k: v for k, v in state.items()}))   # safetensors: disjoint views are fine
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    buf = io.BytesIO()
    torch.save(state, buf)
    size = buf.tell()
    assert size < 1.05 * sum(v.numel() * v.element_size() for v in state.values()) + 200_000   # no bigger file
    buf.seek(0)
    fresh = _model(seed=3)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    twin = copy.deepcopy(model)   # new parameters: stacked at every call until flattened again, same outputs
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(twin(x), ref, rtol=1e-5, atol=1e-6)


def test_training_through_flattened_parameters_matches_native():
    model = _model().train()
    plain = _plain(model).train()
    x = torch.randn(2, 3, 64, 64)
    for m in (model, plain):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    layer = _layers(model)[0]
    assert _flat(layer) is not None   # optimizer steps write in place: the views stay
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('bias', [True, False])
def test_a_layer_without_biases_and_functional_call(bias):
    from sequencer.models.blocks import RNN2D
    layer = sequencer.set_engine(RNN2D(16, 8, bias=bias), 'fused')
    assert _flat(layer) is not None
    x = torch.randn(2, 5, 7, 16)
    with torch.no_grad():
        out = layer(x)
        ref = RNN2D.forward(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    swapped = {k: v.clone() * 0.5 for k, v in layer.state_dict().items()}
    with torch.no_grad():
        got = torch.func.functional_call(layer, swapped, (x,))
        want = torch.func.functional_call(sequencer.set_engine(copy.deepcopy(layer), 'native'), swapped, (x,))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert _flat(layer) is not None and not any(v.data_ptr() == p.data_ptr() for v in swapped.values()
                                                for p in layer.parameters())
