"""timm's model contract, for every model of the table.

timm's ``tests/test_models.py`` holds its standard models to: a forward pass (and the same output with
gradient checkpointing), a backward pass reaching every parameter, a pretrained config that describes the
model (pool size, classifier and first-conv names, the pooled and unpooled outputs without head),
features-only backbones (default and 'getter'), ``forward_intermediates``, torch.fx tracing (forward equal
to eager, backward) and TorchScript. These are the same checks in this project's words, with outputs compared
numerically against eager ones or hand-computed references.

Models come from ``sequencer.create_model`` (the default engine). FX tracing is checked on the default and
the 'native' engine; TorchScript the timm way (built inside ``set_layer_config(scriptable=True)``) and on a
model built on the default engine. Each of timm's checks runs the real Sequencer2D-S and vanilla Sequencer-S;
the other rows keep what makes them a variant (mixer, union, fc, RNN kind, position embedding, patch sizes,
input size) and are built with one block per stage and an eighth of the widths, since the point there is the
API. The checks run on one thread (see ``_one_thread``).
"""
import ast
import functools
import math
import pathlib

import pytest
import torch
from timm.layers import get_channel_dim, get_spatial_dim, set_layer_config
from timm.models import (
    FeatureDictNet,
    FeatureGraphNet,
    FeatureHookNet,
    FeatureInfo,
    FeatureListNet,
    get_notrace_functions,
    get_notrace_modules,
)
from timm.models._features import FeatureGetterNet
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import sequencer
from sequencer.models import get_spec

REAL = ('sequencer2d_s', 'v_sequencer_s')     # built as in the table


def slow_if_real(name: str):
    """Scripting the real models takes about 5 s each."""
    return pytest.param(name, marks=pytest.mark.slow) if name in REAL else name


NAMES = sequencer.list_models()
ENGINES = [pytest.param(None, id='default'), pytest.param('native', id='native')]
SIZE = 64                                      # the side of the small inputs
SHRINK = 8                                     # width divisor of the non-REAL rows


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """These checks are about the API and the numbers, not speed: on one thread. (On a shared 2-core machine two
    threads make oneDNN's LSTM wait at a barrier on every time step for a busy core: seconds per call where one
    thread takes a millisecond.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, engine=None, **kwargs) -> torch.nn.Module:
    """``sequencer.create_model(name, **kwargs)``: as in the table for REAL, else one block per stage and widths
    divided by SHRINK (which keeps every row's width constraints: with_fc=False and the vanilla mixer need
    the RNN output as wide as the channels)."""
    if name not in REAL:
        args = get_spec(name).args
        kwargs.setdefault('layers', (1, 1, 1, 1))
        kwargs.setdefault('embed_dims', tuple(d // SHRINK for d in args['embed_dims']))
        kwargs.setdefault('hidden_sizes', tuple(h // SHRINK for h in args['hidden_sizes']))
    if engine is not None:
        kwargs['rnn_engine'] = engine
    return sequencer.create_model(name, **kwargs)


def random_head(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random classifier weights: the zero-initialised head would make every logit 0 (the rest of the
    initialisation is already random)."""
    g = torch.Generator().manual_seed(seed)
    fc = model.get_classifier()
    with torch.no_grad():
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) * 0.1)
        fc.bias.copy_(torch.randn(fc.bias.shape, generator=g) * 0.1)
    return model


def grid_sizes(name: str, side: int):
    """(H, W) of each stage's output for a side x side input: every stage divides by its patch size, rounding down."""
    sizes, s = [], side
    for p in get_spec(name).args['patch_sizes']:
        s //= p
        sizes.append((s, s))
    return sizes


def image(side: int = SIZE, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def seeded(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """``build`` after seeding the global RNG: two calls give the same initial weights."""
    torch.manual_seed(seed)
    return build(name, **kwargs).eval()


# ---- forward / backward -------------------------------------------------------------------------------

@pytest.mark.parametrize('name', NAMES)
def test_forward_gives_logits_and_checkpointing_changes_nothing(name):
    model = random_head(build(name)).eval()
    x = image(batch=2)
    out = model(x)
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all() and out.std() > 0
    # each image is classified on its own: a row of the batch is what that image alone gives
    torch.testing.assert_close(model(x[1:]), out[1:], rtol=1e-4, atol=1e-5)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', NAMES)
def test_backward_reaches_every_parameter(name):
    model = build(name, num_classes=42).train()
    out = model(image(batch=2))
    assert out.shape == (2, 42)
    out.mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f'no gradient for {no_grad}'
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(p.grad.numel() for p in model.parameters()) == sum(p.numel() for p in model.parameters())

    # without head (num_classes=0) the output is the pooled features, and the backward still reaches everything
    encoder = build(name, num_classes=0).train()
    assert encoder.num_classes == 0
    out = encoder(image(batch=2))
    assert out.shape == (2, encoder.num_features)
    out.mean().backward()
    assert all(p.grad is not None for p in encoder.parameters())


# ---- pretrained config --------------------------------------------------------------------------------

@pytest.mark.parametrize('name', NAMES)
def test_default_cfg_describes_the_model(name):
    spec = get_spec(name)
    model = random_head(build(name)).eval()
    cfg = model.default_cfg
    assert cfg is model.pretrained_cfg
    assert cfg['architecture'] == name
    assert cfg['input_size'] == spec.input_size and cfg['num_classes'] == 1000 == model.num_classes
    assert model.num_features > 0 and model.head_hidden_size > 0
    # the classifier and first convolution the config names are the model's
    state = model.state_dict()
    assert state[cfg['classifier'] + '.weight'].shape == (1000, model.head_hidden_size)
    assert state[cfg['first_conv'] + '.weight'].shape[1] == 3
    # the pool size is the final map at the config's input size (measured below for the real models)
    assert tuple(cfg['pool_size']) == grid_sizes(name, spec.input_size[-1])[-1]

    # forward_features is unpooled, in the layout the model declares
    assert model.output_fmt == 'NHWC'
    h_axis, w_axis = get_spatial_dim(model.output_fmt)
    c_axis = get_channel_dim(model.output_fmt)
    if name in REAL:
        with torch.no_grad():
            full = model.forward_features(image(spec.input_size[-1]))
        assert (full.shape[h_axis], full.shape[w_axis]) == tuple(cfg['pool_size'])
        assert full.shape[c_axis] == model.num_features
    x = image()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, *grid_sizes(name, SIZE)[-1], model.num_features)
        pre = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pre, feats.mean(dim=(h_axis, w_axis)))   # average pooling, by hand
        assert pre.shape == (1, model.head_hidden_size)
        head = model.get_classifier()
        torch.testing.assert_close(model(x), pre @ head.weight.T + head.bias, rtol=1e-4, atol=1e-5)
        # without classifier: the pooled features; without pooling too: the unpooled map
        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, '')
        torch.testing.assert_close(model(x), feats)

    # the same from the constructor
    headless = build(name, num_classes=0, global_pool='').eval()
    assert headless.num_classes == 0
    with torch.no_grad():
        out = headless(x)
    assert out.shape == (1, *grid_sizes(name, SIZE)[-1], headless.num_features)


def test_pool_size_of_each_input_size():
    assert get_spec('sequencer2d_s').pretrained_cfg['pool_size'] == (16, 16)
    assert get_spec('sequencer2d_l_392').pretrained_cfg['pool_size'] == (28, 28)
    assert get_spec('v_sequencer_s').pretrained_cfg['pool_size'] == (16, 16)    # 14 px patches at 224


def test_default_cfg_names_the_weights():
    cfg = get_spec('sequencer2d_m_392').pretrained_cfg
    assert cfg['url'].endswith('/sequencer2d_m.pth') and cfg['hf_hub_id'] == 'timm/sequencer2d_m.in1k'
    assert cfg['crop_pct'] == 1.0 and cfg['input_size'] == (3, 392, 392)
    assert get_spec('gru_sequencer2d_s').pretrained_cfg['url'] == ''


# ---- features_only --------------------------------------------------------------------------------------

def check_maps(maps, backbone, name, side, fmt='NCHW'):
    """The maps have the channels / reductions of ``backbone.feature_info`` and the exact grid of each stage."""
    info = backbone.feature_info
    assert len(maps) == len(info.channels())
    grids = grid_sizes(name, side)
    for m, c, r, i in zip(maps, info.channels(), info.reduction(), info.out_indices):
        assert m.shape[0] == 1 and m.shape[get_channel_dim(fmt)] == c
        hw = tuple(m.shape[a] for a in get_spatial_dim(fmt))
        assert hw == grids[i]
        assert all(s <= math.ceil(side / r) + 1 for s in hw)   # timm's bound
        assert torch.isfinite(m).all()


@pytest.mark.parametrize('name', NAMES)
def test_features_only_backbone(name):
    model = seeded(name)
    backbone = seeded(name, features_only=True)
    assert isinstance(backbone, FeatureGetterNet)
    assert backbone.feature_info.channels() == list(model.embed_dims)
    assert backbone.feature_info.reduction() == [f['reduction'] for f in model.feature_info]
    # a backbone has no classifier, and its config does not name one
    assert not any(k.startswith('model.head.fc') for k in backbone.state_dict())
    cfg = backbone.default_cfg
    assert cfg is backbone.pretrained_cfg
    assert 'classifier' not in cfg and 'num_classes' not in cfg
    assert cfg['pool_size'] == model.default_cfg['pool_size'] and cfg['first_conv'] == 'stem.proj'
    assert 'classifier' in model.default_cfg  # the full model's config is left as it was

    x = image()
    with torch.no_grad():
        maps = backbone(x)
        _, reference = model.forward_intermediates(x)
    assert backbone.output_fmt == 'NCHW'
    check_maps(maps, backbone, name, SIZE)
    for m, r in zip(maps, reference):
        torch.testing.assert_close(m, r)

    # 'getter' named, chosen stages (a negative index counts from the end), the model's own NHWC layout; the
    # stages after the last one asked for are pruned
    picked = seeded(name, features_only=True, feature_cls='getter', out_indices=(0, -3),
                    feature_cfg=dict(output_fmt='NHWC'))
    assert isinstance(picked, FeatureGetterNet) and picked.feature_info.out_indices == (0, 1)
    assert len(picked.model.stages) == 2
    with torch.no_grad():
        maps = picked(x)
    check_maps(maps, picked, name, SIZE, 'NHWC')
    for m, r in zip(maps, reference[:2]):
        torch.testing.assert_close(m, r.permute(0, 2, 3, 1))


# ---- forward_intermediates ------------------------------------------------------------------------------

@pytest.mark.parametrize('name', NAMES)
def test_forward_intermediates(name):
    model = build(name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) == 4
    x = image()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert len(maps) == 4
        for m, c, hw in zip(maps, info.channels(), grid_sizes(name, SIZE)):
            assert m.shape == (1, c, *hw)
        torch.testing.assert_close(final, model.forward_features(x))
        # the last map is the last stage before the final norm: normalising it gives forward_features
        torch.testing.assert_close(model.norm(maps[-1].permute(0, 2, 3, 1)), final)
        _, nhwc = model.forward_intermediates(x, indices=[0, 3], output_fmt='NHWC')
        torch.testing.assert_close(nhwc[0], maps[0].permute(0, 2, 3, 1))
        torch.testing.assert_close(nhwc[1], maps[3].permute(0, 2, 3, 1))
        last_two = model.forward_intermediates(x, indices=2, norm=True, intermediates_only=True)
        assert len(last_two) == 2
        torch.testing.assert_close(last_two[0], maps[2])
        torch.testing.assert_close(last_two[1], final.permute(0, 3, 1, 2))   # norm: the last one normalised
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], maps[1])
    # gradient checkpointing (with gradients: that is when it is used) does not change the result
    model.set_grad_checkpointing(True)
    final2, maps2 = model.forward_intermediates(x)
    torch.testing.assert_close(final2, final, rtol=1e-4, atol=1e-5)
    for a, b in zip(maps2, maps):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- torch.fx -------------------------------------------------------------------------------------------

@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('name', NAMES)
def test_fx_graph_forward_equals_eager_and_backward_reaches_every_parameter(name, engine):
    """timm's FX forward and backward checks on one traced model: torchvision's feature extractor returning the
    output node, traced with timm's leaf modules and functions and parameter shapes as constants; in eval mode
    its output is the eager output exactly, in train mode the backward reaches every parameter."""
    model = random_head(build(name, engine, num_classes=42)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    kwargs = dict(leaf_modules=list(get_notrace_modules()), autowrap_functions=list(get_notrace_functions()),
                  param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    assert train_nodes[-1] == eval_nodes[-1]   # one output in both modes: the head's
    traced = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                      eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kwargs).eval()
    x = image()
    with torch.no_grad():
        eager = model(x)
        out = list(traced(x).values())
    assert len(out) == 1 and out[0].shape == (1, 42)
    assert torch.equal(out[0], eager)
    assert torch.isfinite(eager).all() and eager.std() > 0

    traced.train()
    out = torch.cat(list(traced(image(batch=2)).values()))
    assert out.shape == (2, 42)
    out.mean().backward()
    no_grad = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not no_grad, f'no gradient for {no_grad}'
    assert sum(p.grad.numel() for p in traced.parameters()) == n_params
    assert torch.isfinite(out).all()


# ---- TorchScript ----------------------------------------------------------------------------------------

def check_scripted(model, batch: int = 2):
    scripted = torch.jit.script(model)
    x = image(batch=batch)
    with torch.no_grad():
        out, eager = scripted(x), model(x)
    assert out.shape == (batch, model.num_classes)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(out).all() and out.std() > 0


@pytest.mark.parametrize('name', [slow_if_real(n) for n in NAMES])
def test_torchscript_equals_eager(name):
    """timm's way: the model built inside ``set_layer_config(scriptable=True)``, then scripted."""
    with set_layer_config(scriptable=True):
        model = random_head(build(name)).eval()
    check_scripted(model)


@pytest.mark.slow
@pytest.mark.parametrize('name', REAL)
def test_torchscript_of_a_model_on_the_default_engine(name):
    """A model built outside the scriptable config, on the default engine, scripts too (and gives its eager output)."""
    check_scripted(random_head(build(name)).eval())


@pytest.mark.parametrize('name', ['sequencer2d_s_add', 'v_sequencer_s_pe'])
def test_torchscript_of_fx_features(name):
    """timm's FX-feature backbone, scripted (as timm's test of ``feature_cls='fx'`` under TorchScript; API only: two
    reduced rows, one per family)."""
    with set_layer_config(scriptable=True):
        backbone = seeded(name, features_only=True, feature_cfg=dict(feature_cls='fx'))
        reference = seeded(name, features_only=True)
    assert isinstance(backbone, FeatureGraphNet)
    scripted = torch.jit.script(backbone)
    with torch.no_grad():
        maps, expected = scripted(image()), reference(image())
    assert isinstance(maps, list) and len(maps) == 4
    for m, r in zip(maps, expected):
        torch.testing.assert_close(m, r.permute(0, 2, 3, 1))


# ---- the other feature classes ------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def getter_maps(name: str):
    """The default backbone's (getter, NCHW) maps of ``image()``, from the seeded initial weights."""
    with torch.no_grad():
        return seeded(name, features_only=True)(image())


@pytest.mark.parametrize('feature_cls, wrapper', [('fx', FeatureGraphNet), ('hook', FeatureHookNet),
                                                  ('dict', FeatureDictNet), ('list', FeatureListNet)])
@pytest.mark.parametrize('name', ['sequencer2d_s_add', 'v_sequencer_s_pe'])
def test_feature_classes_give_the_getters_maps(name, feature_cls, wrapper):
    """Every wrapper of timm's builder gives the stage outputs; all but the getter in the model's NHWC layout,
    which they declare in ``output_fmt``. (API only: two reduced rows, one per family.)"""
    if feature_cls in ('dict', 'list') and name == 'v_sequencer_s_pe':
        with pytest.raises(ValueError, match='position embedding'):
            build(name, features_only=True, feature_cls=feature_cls)
        return
    backbone = seeded(name, features_only=True, feature_cls=feature_cls, out_indices=(0, 2, 3))
    assert isinstance(backbone, wrapper)
    assert backbone.output_fmt == 'NHWC'
    assert 'classifier' not in backbone.default_cfg and backbone.default_cfg is backbone.pretrained_cfg
    with torch.no_grad():
        maps = backbone(image())
    expected = getter_maps(name)
    if feature_cls == 'dict':
        assert list(maps) == ['0', '2', '3']
        maps = list(maps.values())
    check_maps(maps, backbone, name, SIZE, 'NHWC')
    for m, i in zip(maps, (0, 2, 3)):   # the chain of modules may run the stem another way: 1e-4
        torch.testing.assert_close(m, expected[i].permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def test_feature_arguments_are_checked():
    name = 'sequencer2d_s_add'
    with pytest.raises(ValueError, match="'getter', 'fx', 'hook', 'dict', 'list'"):
        build(name, features_only=True, feature_cls='pyramid')
    with pytest.raises(ValueError, match='features_only'):
        build(name, feature_cls='getter')
    with pytest.raises(ValueError, match='features_only'):
        build(name, out_indices=(0, 1))
    for bad in [(4,), (0, 0), (0, -4), (), 5, 0]:
        with pytest.raises(ValueError, match='out_indices'):
            build(name, features_only=True, out_indices=bad)
    # feature_cfg may name the class and the stages; the keyword arguments win over it
    hook = build(name, features_only=True, feature_cfg=dict(feature_cls='hook', out_indices=(1,)))
    assert isinstance(hook, FeatureHookNet) and hook.feature_info.out_indices == (1,)
    chain = build(name, features_only=True, feature_cls='dict', out_indices=(2,),
                  feature_cfg=dict(feature_cls='hook', out_indices=(1,)))
    assert isinstance(chain, FeatureDictNet) and chain.feature_info.out_indices == (2,)


# ---- layering -------------------------------------------------------------------------------------------

def test_models_import_neither_the_fast_engine_nor_analysis():
    """sequencer.models is the plain PyTorch model: it imports none of the fast engine, analysis, the CLI, the
    training engine or export (module-level and in-function imports alike)."""
    root = pathlib.Path(sequencer.__file__).parent
    forbidden = ('fast', 'analysis', 'cli', 'engine', 'export')
    found = []
    for path in sorted((root / 'models').glob('*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level == 2:   # from ..x import y / from .. import x
                mods = ['sequencer.' + node.module] if node.module else ['sequencer.' + a.name for a in node.names]
            else:
                continue   # not an import, or one within sequencer.models
            for m in mods:
                if any(m == f'sequencer.{f}' or m.startswith(f'sequencer.{f}.') for f in forbidden):
                    found.append(f'{path.name}: {m}')
    assert not found
