"""The architectures: the table, shapes, parity with timm, the model API."""
import pytest
import timm
import torch
from timm.data import resolve_model_data_config
from timm.optim import param_groups_layer_decay

import sequencer
from sequencer import MODELS, Sequencer2D, VanillaSequencer, create_model, list_models
from sequencer.models.weights import load_state_dict

from conftest import randomize

# the reference README's / issue's figures: (params M, GMACs)
PAPER = {'sequencer2d_s': (27.65, 8.4), 'sequencer2d_m': (38.31, 11.1), 'sequencer2d_l': (54.30, 16.6)}


@pytest.mark.parametrize('name', list_models())
def test_every_model_parameters_and_forward(name):
    model = create_model(name).eval()
    assert sequencer.count_params(model) / 1e6 == pytest.approx(MODELS[name].params_m, abs=0.005)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('name', sorted(PAPER))
def test_flops_match_reference_readme(name):
    macs = sequencer.count_flops(create_model(name), (3, 224, 224)) / 1e9
    assert macs == pytest.approx(PAPER[name][1], rel=0.01)


def test_flops_count_the_recurrences():
    by_kind = sequencer.analysis.count_flops_by_kind(create_model('sequencer2d_s'))
    # 4 directions x 4 gates x h x (C + h) per token: stage 1 (32x32 tokens, C=192, h=48) x 4 blocks,
    # stages 2-4 (16x16 tokens, C=384, h=96) x 14 blocks
    expected = 4 * (4 * 48 * 240) * 1024 * 4 + 4 * (4 * 96 * 480) * 256 * 14
    assert by_kind['rnn'] == expected


@pytest.mark.parametrize('name', ['sequencer2d_s', 'sequencer2d_m', 'sequencer2d_l'])
def test_parity_with_timm(name):
    ref = randomize(timm.create_model(name), seed=1).eval()
    ours = create_model(name).eval()
    load_state_dict(ours, ref.state_dict())
    for shape in [(2, 3, 224, 224), (1, 3, 160, 256)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.allclose(ours(x), ref(x), atol=1e-4, rtol=0)


def test_stochastic_depth_grows_linearly():
    model = create_model('sequencer2d_s', drop_path_rate=0.3)
    rates = [getattr(b.drop_path, 'drop_prob', 0.) for s in model.stages for b in s.blocks]
    n = len(rates)
    assert n == 18
    assert rates == pytest.approx([0.3 * i / (n - 1) for i in range(n)])


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    model = create_model('sequencer2d_s', num_classes=7).eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        out = model(torch.randn(1, 3, 160, 256))
    assert out.shape == (1, 7) and out.dtype == dtype and torch.isfinite(out.float()).all()


@pytest.mark.parametrize('name', ['sequencer2d_s', 'sequencer2d_vertical', 'v_sequencer_s'])
@pytest.mark.parametrize('engine', ['auto', 'native', 'fused'])
def test_an_empty_batch(name, engine):
    """A batch of no images (the last shard of an uneven split) gives no logits and zero gradients, with every
    engine (timm's own model fails there: its recurrences reshape with -1)."""
    model = create_model(name, layers=(1, 1, 1, 1), num_classes=5, rnn_engine=engine).train()
    out = model(torch.randn(0, 3, 64, 48))
    assert out.shape == (0, 5)
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(torch.randn(0, 3, 64, 48)).shape == (0, 5)


@pytest.mark.parametrize('engine', ['auto', 'native', 'fused'])
def test_meta_device(engine):
    """Shapes without memory or compute (deferred initialisation, shape inference): the meta device, where
    autocast does not exist, runs forward and backward with every engine; a model built there and
    materialised with ``to_empty`` loads weights and computes what a model built on the CPU computes."""
    with torch.device('meta'):
        model = create_model('sequencer2d_s', layers=(1, 1, 1, 1), num_classes=5)
    sequencer.set_engine(model, engine)
    x = torch.randn(2, 3, 64, 48, device='meta')
    out = model(x)
    assert out.shape == (2, 5) and out.device.type == 'meta'
    out.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())

    ref = randomize(create_model('sequencer2d_s', layers=(1, 1, 1, 1), num_classes=5), seed=2).eval()
    model = model.to_empty(device='cpu').eval()
    load_state_dict(model, ref.state_dict())
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5, rtol=0)


def test_custom_configuration_and_errors():
    m = Sequencer2D(layers=(1, 1), patch_sizes=(4, 2), embed_dims=(16, 32), hidden_sizes=(4, 8),
                    mlp_ratios=(2, 2), num_classes=3, union='add', rnn_layer='gru')
    assert m(torch.randn(1, 3, 32, 40)).shape == (1, 3)
    with pytest.raises(ValueError, match='gives 192 channels for input width 384'):
        Sequencer2D(with_fc=False, hidden_sizes=(48, 48, 96, 96))
    with pytest.raises(ValueError, match='one entry per stage'):
        Sequencer2D(layers=(1, 1, 1), patch_sizes=(7, 2, 1, 1))
    with pytest.raises(ValueError, match='union must be one of'):
        Sequencer2D(union='mul')
    with pytest.raises(ValueError, match='rnn_layer must be one of'):
        Sequencer2D(rnn_layer='transformer')
    with pytest.raises(ValueError, match='gives 96 channels for input width 384'):
        VanillaSequencer(hidden_sizes=(48, 48, 48, 48))
    with pytest.raises(sequencer.UnknownModelError, match='did you mean sequencer2d_s'):
        create_model('sequencer2d_ss')


def test_model_api():
    model = create_model('sequencer2d_s', num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    feats = model.forward_features(x)
    assert feats.shape == (2, 16, 16, 384)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 384)
    assert model.forward_head(feats).shape == (2, 10)
    assert model.get_classifier().out_features == 10
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, 384)
    assert [f['num_chs'] for f in model.feature_info] == [192, 384, 384, 384]
    assert [f['reduction'] for f in model.feature_info] == [7, 14, 14, 14]
    final, inter = model.forward_intermediates(x)
    assert [t.shape for t in inter] == [(2, 192, 32, 32), (2, 384, 16, 16), (2, 384, 16, 16), (2, 384, 16, 16)]
    assert torch.allclose(final, feats)
    only = model.forward_intermediates(x, indices=[1], intermediates_only=True, stop_early=True)
    assert torch.equal(only[0], inter[1])
    cfg = resolve_model_data_config(model)
    assert cfg['interpolation'] == 'bicubic' and cfg['crop_pct'] == 0.875 and cfg['input_size'] == (3, 224, 224)
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['std'] == timm.data.IMAGENET_DEFAULT_STD


def test_features_only_backbone():
    backbone = create_model('sequencer2d_s', features_only=True)
    outs = backbone(torch.randn(1, 3, 160, 256))
    assert [o.shape for o in outs] == [(1, 192, 22, 36), (1, 384, 11, 18), (1, 384, 11, 18), (1, 384, 11, 18)]
    assert backbone.feature_info.channels() == [192, 384, 384, 384]
    two = create_model('sequencer2d_s', features_only=True, out_indices=(0, 1))
    assert [o.shape[1] for o in two(torch.randn(1, 3, 224, 224))] == [192, 384]


def test_group_matcher_drives_layer_decay():
    model = create_model('sequencer2d_s')
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({g['lr_scale'] for g in groups})
    assert len(scales) > 10 and max(scales) == 1.0


def test_gradient_checkpointing_recomputes_blocks():
    torch.manual_seed(0)
    base = randomize(create_model('sequencer2d_s', layers=(1, 1, 1, 1), num_classes=4))
    ckpt = create_model('sequencer2d_s', layers=(1, 1, 1, 1), num_classes=4)
    ckpt.load_state_dict(base.state_dict())
    ckpt.set_grad_checkpointing(True)
    calls = []
    ckpt.stages[0].blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 64, 64)
    out_a, out_b = base(x), ckpt(x)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    assert torch.allclose(out_a, out_b)
    assert len(calls) == 2  # the block ran again in the backward pass
    for (n, pa), pb in zip(base.named_parameters(), ckpt.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_vanilla_position_embedding_and_shuffle():
    model = create_model('v_sequencer_s_pe', layers=(1, 1, 1, 1)).eval()
    assert model.absolute_pos_embed.shape == (1, 16, 16, 384)
    assert model(torch.randn(1, 3, 280, 196)).shape == (1, 1000)  # resampled to 20 x 14
    shuffled = create_model('v_sequencer_s', layers=(1, 1, 1, 1), shuffle=True)
    randomize(shuffled)
    x = torch.randn(1, 3, 112, 112)
    shuffled.eval()
    assert torch.equal(shuffled(x), shuffled(x))
    shuffled.train()
    torch.manual_seed(0)
    a = shuffled(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, shuffled(x))
