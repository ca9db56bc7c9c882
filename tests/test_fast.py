"""The fast engine as a module swap (sequencer.fast.set_engine): classes in and out, the same parameters and
state_dict whatever the engine, and the model contract kept by fast models (TorchScript, FX, copies, pickles).
The plain model (sequencer.models) never imports the fast engine."""
import ast
import copy
import io
from pathlib import Path

import pytest
import torch
from timm.layers import Mlp, PatchEmbed, set_layer_config
from torch import nn

import sequencer
from sequencer import Sequencer2D, VanillaSequencer, create_model, set_engine
from sequencer.fast import (
    FAST,
    PLAIN,
    FastDownsample2D,
    FastMlp,
    FastModule,
    FastPatchEmbed,
    FastRNN2D,
    FastSequencerBlock,
    engine_of,
    to_plain,
)
from sequencer.models.blocks import RNN1D, RNN2D, Downsample2D, SequencerBlock

from conftest import randomize

ROOT = Path(__file__).resolve().parents[1]


def _tiny(**kw):
    """A Sequencer2D-S-shaped model with one block per stage and random weights (the head included)."""
    cfg = dict(layers=(1, 1, 1, 1), patch_sizes=(7, 2, 1, 1), embed_dims=(16, 32, 32, 32),
               hidden_sizes=(4, 8, 8, 8), mlp_ratios=(2, 2, 2, 2), num_classes=5)
    cfg.update(kw)
    torch.manual_seed(0)
    return randomize(Sequencer2D(**cfg), scale=0.2).eval()


def _fast_modules(model):
    return [m for m in model.modules() if isinstance(m, FastModule)]


def _class_counts(model):
    counts = {}
    for m in model.modules():
        counts[type(m)] = counts.get(type(m), 0) + 1
    return counts


def test_set_engine_swaps_classes_in_place_and_back():
    model = _tiny()
    plain = _class_counts(model)
    assert not _fast_modules(model) and engine_of(model) == 'native'
    assert set_engine(model, 'auto') is model
    fast = _class_counts(model)
    for cls, fast_cls in FAST.items():   # every plain layer of the table became its fast subclass, no other
        assert fast.get(fast_cls, 0) == plain.get(cls, 0) and cls not in fast, cls
    assert {fast[c] for c in (FastRNN2D, FastSequencerBlock, FastMlp)} == {4} and fast[FastPatchEmbed] == 1
    assert fast[FastDownsample2D] == 3   # between the stages
    assert engine_of(model) == 'auto' and all(m.engine == 'auto' for m in model.modules()
                                              if isinstance(m, FastRNN2D))
    assert "engine='auto'" in repr(model)
    set_engine(model, 'fused', fused_mlp=False, fused_norm=False, fused_residual=False)
    assert engine_of(model) == 'fused'
    assert all(not m.fused for m in model.modules() if isinstance(m, FastMlp))
    assert all(not b.fused_norm and not b.fused_residual for b in model.modules() if isinstance(b, FastSequencerBlock))
    model(torch.randn(1, 3, 28, 28))      # runs, which leaves state (the LSTM parameter references) behind
    assert set_engine(model, 'native') is model
    assert _class_counts(model) == plain and not _fast_modules(model) and engine_of(model) == 'native'
    block = model.stages[0].blocks[0]
    assert type(block) is SequencerBlock and type(block.rnn_tokens) is RNN2D and type(block.mlp_channels) is Mlp
    assert type(model.stem) is PatchEmbed and type(model.stages[1].downsample) is Downsample2D
    for m in model.modules():             # no setting of the fast classes left on the plain modules
        assert not {'engine', 'fused', 'fused_norm', 'fused_residual', '_lstm_refs'} & set(vars(m)), type(m)


def test_only_exact_plain_classes_are_swapped():
    """A user's subclass of a plain layer keeps its own class (and forward); RNN1D has no fast class."""
    class MyBlock(SequencerBlock):
        pass

    block = MyBlock(16, lambda d: RNN2D(d, 4), mlp_ratio=2)
    set_engine(block, 'fused')
    assert type(block) is MyBlock and type(block.rnn_tokens) is FastRNN2D and type(block.mlp_channels) is FastMlp
    vanilla = set_engine(VanillaSequencer(layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32),
                                          hidden_sizes=(8, 16, 16, 16), num_classes=5), 'auto')
    assert any(type(m) is RNN1D for m in vanilla.modules())
    assert not any(isinstance(m, FastRNN2D) for m in vanilla.modules())
    assert PLAIN == {v: k for k, v in FAST.items()}


@pytest.mark.parametrize('engine', ['auto', 'fused'])
def test_state_dict_keys_and_values_are_the_same_whatever_the_engine(engine):
    model = _tiny()
    before = model.state_dict()
    params = [id(p) for p in model.parameters()]
    set_engine(model, engine)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    # the same storage, except the LSTM parameters of CPU float32 layers: views of one buffer per kind
    # (lstm2d.flatten_weights, tests/test_flat_weights.py)
    moved = {k for k in before if after[k].data_ptr() != before[k].data_ptr()}
    assert moved == ({k for k in before if '.rnn_v.' in k or '.rnn_h.' in k} if engine != 'native' else set())
    assert [id(p) for p in model.parameters()] == params   # the very same Parameter objects
    other = set_engine(_tiny(num_classes=5), 'native')
    randomize(other, seed=3)
    model.load_state_dict(other.state_dict())               # strict: one engine's checkpoint loads into another
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        torch.testing.assert_close(model(x), other(x), atol=1e-5, rtol=0)


def test_create_model_native_has_no_fast_module():
    native = create_model('sequencer2d_s', layers=(1, 1, 1, 1), rnn_engine='native')
    assert not [type(m) for m in native.modules() if type(m).__module__.startswith('sequencer.fast')]
    fast = create_model('sequencer2d_s', layers=(1, 1, 1, 1))   # 'auto' by default
    assert engine_of(fast) == 'auto' and any(isinstance(m, FastRNN2D) for m in fast.modules())
    assert list(fast.state_dict()) == list(native.state_dict())
    plain = sequencer.models.create_model('sequencer2d_s', layers=(1, 1, 1, 1))   # the plain builder
    assert not _fast_modules(plain)
    with set_layer_config(scriptable=True):   # timm's scriptable / exportable settings: the plain model
        assert not _fast_modules(create_model('sequencer2d_s', layers=(1, 1, 1, 1)))
    with set_layer_config(exportable=True):
        assert not _fast_modules(create_model('sequencer2d_s', layers=(1, 1, 1, 1)))
    with pytest.raises(ValueError, match='engine must be one of'):
        create_model('sequencer2d_s', layers=(1, 1, 1, 1), rnn_engine='cudnn')


def _imported(source: str, package: str):
    """Every module an ``import`` statement in ``source`` (a module of ``package``) names, made absolute: for
    ``from X import a`` both X and X.a (a may be a submodule)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package.split('.')
            base = '.'.join(base[:len(base) - node.level + 1]) if node.level else ''
            module = '.'.join(p for p in (base, node.module or '') if p)
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def test_models_package_never_imports_the_fast_engine():
    """sequencer/models/ is the paper's model in plain PyTorch: no import of sequencer.fast, absolute or
    relative, anywhere in its source (functions included)."""
    def fast(name):
        return name == 'sequencer.fast' or name.startswith('sequencer.fast.')

    for snippet in ('from ..fast import set_engine', 'from .. import fast', 'import sequencer.fast.modules',
                    'from sequencer import fast', 'def f():\n    from ..fast.lstm2d import fused_rnn2d'):
        assert any(fast(name) for _, name in _imported(snippet, 'sequencer.models')), snippet   # the check works
    assert not any(fast(name) for _, name in _imported('from .blocks import RNN2D\nfrom .. import errors',
                                                       'sequencer.models'))
    files = sorted((ROOT / 'sequencer' / 'models').glob('*.py'))
    assert len(files) >= 5
    for path in files:
        for lineno, name in _imported(path.read_text(), 'sequencer.models'):
            assert not fast(name), f"{path.relative_to(ROOT)}:{lineno} imports {name}"


def test_torch_jit_script_turns_a_fast_model_plain():
    model = set_engine(_tiny(), 'auto')
    x = torch.randn(1, 3, 28, 35)
    with torch.no_grad():
        want = model(x)
    scripted = torch.jit.script(model)
    assert not _fast_modules(model) and engine_of(model) == 'native'   # scripting made the model itself plain
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize('engine', ['native', 'auto', 'fused'])
def test_fx_symbolic_trace_equals_eager(engine):
    """torch.fx.symbolic_trace traces plain and fast models alike (the fast modules run their plain forward
    while traced); the graph computes what the eager model computes."""
    model = set_engine(_tiny(), engine)
    x = torch.randn(2, 3, 28, 42)
    graph = torch.fx.symbolic_trace(model)
    assert engine_of(model) == engine    # tracing leaves the model as it was
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), atol=1e-5, rtol=0)
    assert any(n.op == 'call_module' and isinstance(graph.get_submodule(n.target), nn.LSTM) for n in graph.graph.nodes)


def test_fast_models_deepcopy_and_pickle_whole():
    """copy.deepcopy and torch.save / torch.load of a whole fast model keep its classes, its settings and its
    outputs."""
    model = set_engine(_tiny(), 'fused', fused_mlp=False)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert _class_counts(other) == _class_counts(model) and engine_of(other) == 'fused'
        assert all(not m.fused for m in other.modules() if isinstance(m, FastMlp))
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(other.parameters(), model.parameters()))
        with torch.no_grad():
            torch.testing.assert_close(other(x), want, atol=1e-6, rtol=0)
        other(x).sum().backward()    # trains: the copy's own parameters get gradients
        assert all(p.grad is not None for p in other.parameters())
        assert all(p.grad is None for p in model.parameters())
    set_engine(other, 'native')
    assert not _fast_modules(other) and _fast_modules(model)


def test_to_plain_is_one_module():
    model = set_engine(_tiny(), 'auto')
    block = model.stages[0].blocks[0]
    to_plain(block)
    assert type(block) is SequencerBlock and type(block.rnn_tokens) is FastRNN2D   # its children stay fast
