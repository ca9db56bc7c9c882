"""The 'auto' engine's measured choice (sequencer.fast.autotune): the rule with injected timings, the cache on disk,
and its use by FastRNN2D. Every test gets its own cache directory."""
import json

import pytest
import torch

from sequencer.analysis.benchmark import _resolved_engine
from sequencer.cli import main as cli_main
from sequencer.fast import autotune, cpu_kernel, set_engine
from sequencer.fast.modules import FastRNN2D
from sequencer.fast.rules import auto_engine
from sequencer.models.blocks import RNN2D


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / 'cache'))
    monkeypatch.delenv(autotune.ENV, raising=False)
    monkeypatch.setenv('SEQUENCER_GEMM', 'mkl')   # the layers' choice alone (tests/test_gemm.py: the GEMMs')
    autotune._memory.clear()   # a fresh process, as far as the cache is concerned
    yield
    autotune._memory.clear()


class FakeTimer:
    """Says each candidate takes ``seconds[name]``, without running it; counts its calls."""

    def __init__(self, **seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, name, fn):
        self.calls.append(name)
        return self.seconds[name]


def _candidates(ran=None):
    return {name: (lambda name=name: ran.append(name) if ran is not None else None) for name in ('fused', 'native')}


def test_fastest_is_chosen_and_cached_on_disk():
    timer = FakeTimer(fused=0.02, native=0.01)
    assert autotune.choose('layer A', _candidates(), timer=timer, steps=3) == 'native'
    # rounds alternate the order: fused native | native fused | fused native
    assert timer.calls == ['fused', 'native', 'native', 'fused', 'fused', 'native']
    data = json.loads(autotune.cache_path().read_text())
    (section, entries), = data['entries'].items()
    assert section == f"{autotune.processor_id()} | torch {torch.__version__}"
    assert entries['layer A'] == {'choice': 'native', 'ms': {'fused': 20.0, 'native': 10.0}}
    assert autotune.choices() == {'layer A': 'native'}

    # a new process (memory empty) reads the file and measures nothing
    autotune._memory.clear()
    again = FakeTimer(fused=0.01, native=0.02)
    assert autotune.choose('layer A', _candidates(), timer=again) == 'native'
    assert again.calls == []
    # another key is measured
    assert autotune.choose('layer B', _candidates(), timer=again) == 'fused'
    assert len(again.calls) > 0
    assert autotune.choices() == {'layer A': 'native', 'layer B': 'fused'}


def test_budget_limits_the_rounds_and_the_best_time_decides():
    timer = FakeTimer(fused=0.6, native=0.7)   # one round spends the 1 s budget
    assert autotune.choose('big', _candidates(), timer=timer, steps=5, budget_s=1.0) == 'fused'
    assert timer.calls == ['fused', 'native']
    # noise only adds time: a slow call does not decide when there are more
    times = {'fused': [0.5, 0.01, 0.01], 'native': [0.02, 0.02, 0.02]}
    choice = autotune.choose('noisy', _candidates(), timer=lambda n, fn: times[n].pop(0), steps=3)
    assert choice == 'fused' and times == {'fused': [], 'native': []}


def test_warmups_run_once_before_the_timing():
    ran = []
    timer = FakeTimer(fused=2, native=1)
    warm = {name: (lambda name=name: ran.append('warm ' + name)) for name in ('fused', 'native')}
    timed = {name: (lambda name=name: ran.append(name)) for name in ('fused', 'native')}
    assert autotune.choose('w', timed, timer=lambda n, fn: (fn(), timer(n, fn))[1], steps=2,
                           budget_s=10, warmup=warm) == 'native'
    assert ran == ['warm fused', 'warm native', 'fused', 'native', 'native', 'fused']


def test_the_default_timer_runs_the_candidates():
    ran = []
    assert autotune.choose('real', _candidates(ran), steps=2) in ('fused', 'native')
    assert sorted(ran) == ['fused', 'fused', 'native', 'native']


def test_clear_cache(capsys):
    autotune.choose('layer', _candidates(), timer=FakeTimer(fused=1, native=2))
    assert autotune.cache_path().exists()
    assert cli_main(['autotune']) == 0
    out = capsys.readouterr().out
    assert str(autotune.cache_path()) in out and 'layer: fused (fused 1000.0 ms, native 2000.0 ms)' in out
    assert cli_main(['autotune', '--clear']) == 0
    assert f"removed {autotune.cache_path()}" in capsys.readouterr().out
    assert not autotune.cache_path().exists() and autotune.choices() == {}
    timer = FakeTimer(fused=2, native=1)
    assert autotune.choose('layer', _candidates(), timer=timer) == 'native' and timer.calls   # measured again
    assert autotune.clear_cache() is True and autotune.clear_cache() is False


@pytest.mark.parametrize('content', ['{not json', '[1, 2]', '{"format": 99, "entries": {}}',
                                     '{"format": 1, "entries": {"x": 3}}'])
def test_a_corrupt_cache_file_is_ignored_and_replaced(content):
    path = autotune.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert autotune.choices() == {}
    assert autotune.choose('layer', _candidates(), timer=FakeTimer(fused=2, native=1)) == 'native'
    assert json.loads(path.read_text())['format'] == autotune.FORMAT
    assert autotune.choices() == {'layer': 'native'}


def test_an_unwritable_cache_keeps_the_choice_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    monkeypatch.setenv(autotune.CACHE_ENV, str(blocker / 'cache'))   # its parent is a file: cannot be created
    monkeypatch.setitem(autotune._warned, 'write', False)
    timer = FakeTimer(fused=2, native=1)
    with pytest.warns(UserWarning, match='cannot write the autotune cache'):
        assert autotune.choose('layer', _candidates(), timer=timer) == 'native'
    n = len(timer.calls)
    assert autotune.choose('layer', _candidates(), timer=timer) == 'native' and len(timer.calls) == n
    assert list(tmp_path.iterdir()) == [blocker]


# ---- FastRNN2D ------------------------------------------------------------------------------------------------

def _pair(union='cat', seed=0):
    torch.manual_seed(seed)
    plain = RNN2D(6, 3, union=union)
    fast = set_engine(RNN2D(6, 3, union=union), 'auto')
    fast.load_state_dict(plain.state_dict())
    return plain, fast


@pytest.mark.parametrize('winner', ['native', 'fused'])
@pytest.mark.parametrize('grad', [False, True])
def test_auto_layer_runs_the_measured_winner(monkeypatch, winner, grad):
    timer = FakeTimer(**{'fused': 1.0, 'native': 1.0, winner: 0.5})
    monkeypatch.setattr(autotune, 'time_call', lambda name, fn, device='cpu': timer(name, fn))
    plain, fast = _pair()
    x = torch.randn(2, 4, 5, 6, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        assert fast.engine_decision(x) == (winner, 'measured')
        calls = len(timer.calls)
        assert calls > 0
        y = fast(x)
        assert fast.resolved_engine(x) == winner and len(timer.calls) == calls   # cached: not measured again
        assert fast.resolved_engine() == winner                                  # without x: the last decision
        torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-6)
    assert autotune.describe(fast) == f"auto: {'train' if grad else 'infer'}: {winner} x 1 (measured)"
    (key, choice), = autotune.choices().items()
    assert choice == winner and key.startswith('cpu 2x4x5x6 hidden=3 union=cat')
    assert ('train' if grad else 'infer') in key.split()


def test_measuring_leaves_parameters_and_their_grads_alone():
    plain, fast = _pair(seed=1)
    marker = {n: torch.full_like(p, 7.0) for n, p in fast.named_parameters()}
    for n, p in fast.named_parameters():
        p.grad = marker[n].clone()
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    x = torch.randn(2, 4, 4, 6, requires_grad=True)
    y = fast(x)   # the real timer: both engines run forward + backward on a copy of x
    assert fast.engine_decision(x)[1] == 'measured'
    for n, p in fast.named_parameters():
        assert torch.equal(p.grad, marker[n]), n
    for k, v in fast.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert x.grad is None
    # and the gradients of the real call are the plain model's
    for p in fast.parameters():
        p.grad = None
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    plain(x).sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_autotune_off_falls_back_to_the_rule_table(monkeypatch):
    monkeypatch.setenv(autotune.ENV, '0')
    monkeypatch.setattr(autotune, 'choose', lambda *a, **k: pytest.fail('measured with SEQUENCER_AUTOTUNE=0'))
    _, fast = _pair()
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        rule = auto_engine('cpu', torch.float32, False, False, cpu_kernel.available())
        assert fast.engine_decision(x) == (rule, 'rule')
        fast(x)
    assert autotune.describe(fast) == f'auto: infer: {rule} x 1 (rule)'
    assert not autotune.cache_path().exists()


def test_forced_engines_are_not_measured(monkeypatch):
    monkeypatch.setattr(autotune, 'choose', lambda *a, **k: pytest.fail('measured a forced engine'))
    _, fast = _pair()
    x = torch.randn(2, 4, 5, 6)
    fast.engine = 'fused'
    assert fast.engine_decision(x) == ('fused', 'set')
    fast.engine = 'native'
    assert fast.engine_decision(x) == ('native', 'set')
    assert autotune.describe(fast) == 'native x 1 (set)'
    assert autotune.describe(RNN2D(6, 3)) == 'native'


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = set_engine(RNN2D(6, 3), 'auto')

    def forward(self, x):
        return self.rnn(x.permute(0, 2, 3, 1))


@pytest.mark.filterwarnings('ignore::FutureWarning', 'ignore::torch.jit.TracerWarning')
def test_no_measuring_while_tracing_exporting_or_counting(monkeypatch):
    monkeypatch.setattr(autotune, 'choose', lambda *a, **k: pytest.fail('measured inside a traced graph'))
    model = _Tiny().eval()
    x = torch.randn(1, 6, 3, 4)
    with torch.no_grad():
        # (check_trace=False: the check reruns the model eagerly, where measuring would be legitimate)
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), RNN2D.forward(model.rnn, x.permute(0, 2, 3, 1)))
        torch.fx.symbolic_trace(model)   # the fast module is a leaf for FX; its own trace runs no measurement
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False):
            model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert model.rnn.engine_decision(x.permute(0, 2, 3, 1), compiling=True)[1] == 'rule'
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), traced(x))
    monkeypatch.setattr(torch.onnx, 'is_in_onnx_export', lambda: True)
    assert model.rnn.engine_decision(x.permute(0, 2, 3, 1)) == ('native', 'set')   # ONNX: the standard ops
    assert not autotune.cache_path().exists()


def test_measuring_does_not_recurse(monkeypatch):
    """While a choice is being measured, the layer asks the rule table (the candidates never call autotune)."""
    _, fast = _pair()
    x = torch.randn(2, 4, 5, 6)
    seen = []

    def timer(name, fn):
        seen.append(fast.engine_decision(x)[1])
        fn()
        return 1.0 if name == 'fused' else 2.0

    monkeypatch.setattr(autotune, 'time_call', lambda name, fn, device='cpu': timer(name, fn))
    with torch.no_grad():
        assert fast.engine_decision(x) == ('fused', 'measured')
    assert seen and set(seen) == {'rule'}


def test_a_model_reports_its_choices(monkeypatch):
    monkeypatch.setattr(autotune, 'time_call', lambda name, fn, device='cpu': 1.0 if name == 'native' else 2.0)
    model = torch.nn.Sequential(set_engine(RNN2D(6, 3), 'auto'), set_engine(RNN2D(6, 3), 'auto'),
                                set_engine(RNN2D(6, 3), 'fused'))
    assert autotune.describe(model) == 'auto: not run eagerly yet; fused x 1 (set)'
    x = torch.randn(1, 3, 3, 6)
    model(x)
    with torch.no_grad():
        model(x)
    assert autotune.describe(model) == ('auto: infer: native x 2 (measured); train: native x 2 (measured); '
                                        'fused x 1 (set)')
    assert isinstance(model[0], FastRNN2D)


def test_benchmark_says_when_the_engine_was_measured(monkeypatch):
    monkeypatch.setattr(autotune, 'time_call', lambda name, fn, device='cpu': 1.0 if name == 'native' else 2.0)
    model = torch.nn.Sequential(set_engine(RNN2D(6, 3), 'auto'))
    cpu = torch.device('cpu')
    with torch.no_grad():
        model(torch.randn(1, 3, 3, 6))
    assert _resolved_engine(model, 'infer', cpu, 'fp32') == 'native (measured)'
    monkeypatch.setattr(autotune, 'time_call', lambda name, fn, device='cpu': 2.0 if name == 'native' else 1.0)
    model(torch.randn(1, 3, 3, 6))
    impl = 'kernel' if cpu_kernel.available() else 'torch'
    assert _resolved_engine(model, 'train', cpu, 'fp32') == f'fused[{impl}] (measured)'
    model[0].engine = 'fused'
    assert _resolved_engine(model, 'train', cpu, 'fp32') == f'fused[{impl}]'


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('grad', [False, True])
def test_cuda_auto_layer_is_measured_where_triton_runs(monkeypatch, grad):
    """On CUDA with the Triton kernels, eager 'auto' times both engines too (under bf16 autocast here), and runs
    the winner; the key names the device and the choice is cached under the GPU's name."""
    from sequencer.fast.runtime import triton_ok
    if not triton_ok():
        pytest.skip('needs Triton')
    timer = FakeTimer(fused=0.5, native=1.0)
    seen = []
    monkeypatch.setattr(autotune, 'time_call', lambda name, fn, device='cpu': (seen.append(device), timer(name, fn))[1])
    _, fast = _pair()
    fast = fast.cuda()
    x = torch.randn(2, 4, 5, 6, device='cuda', requires_grad=grad)
    with torch.set_grad_enabled(grad), torch.autocast('cuda', dtype=torch.bfloat16):
        assert fast.engine_decision(x) == ('fused', 'measured')
    assert set(seen) == {'cuda'}
    (key, choice), = autotune.choices('cuda').items()
    assert choice == 'fused' and key.startswith('cuda 2x4x5x6') and 'autocast=bfloat16' in key


def test_measuring_inside_a_checkpointed_forward(monkeypatch):
    """With gradient checkpointing the first forward of a layer shape is measured inside the checkpoint: the
    measurement's own graphs must not meet the checkpoint's saved-tensor hooks (it used to raise CheckpointError),
    and the gradients are those of the plain model."""
    import sequencer

    from conftest import randomize
    torch.manual_seed(0)
    plain = randomize(sequencer.create_model('sequencer2d_s', layers=[1, 1, 1, 1], num_classes=5,
                                             rnn_engine='native'))
    fast = sequencer.create_model('sequencer2d_s', layers=[1, 1, 1, 1], num_classes=5)
    fast.load_state_dict(plain.state_dict())
    fast.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    fast(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert 'measured' in autotune.describe(fast)
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_instruction_set_limits_get_a_cache_section_of_their_own(monkeypatch):
    """Libraries held below the processor's instruction set (e.g. MKL restricted to AVX2) run at other speeds, so
    their choices are measured and kept apart from the unrestricted process's; benchmarks record the limits."""
    from sequencer.analysis.benchmark import environment
    for name in cpu_kernel.ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(autotune, '_PROCESSOR', {})
    plain = autotune.processor_id()
    assert 'isa_limits' not in environment(torch.device('cpu'))
    autotune.choose('layer A', _candidates(), timer=FakeTimer(fused=0.02, native=0.01))

    monkeypatch.setenv('MKL_ENABLE_INSTRUCTIONS', 'AVX2')
    monkeypatch.setattr(autotune, '_PROCESSOR', {})
    autotune._memory.clear()
    assert autotune.processor_id() == plain + ' [MKL_ENABLE_INSTRUCTIONS=AVX2]'
    assert environment(torch.device('cpu'))['isa_limits'] == {'MKL_ENABLE_INSTRUCTIONS': 'AVX2'}
    timer = FakeTimer(fused=0.01, native=0.02)
    assert autotune.choose('layer A', _candidates(), timer=timer) == 'fused'   # measured again, not read back
    assert timer.calls
    assert len(json.loads(autotune.cache_path().read_text())['entries']) == 2
