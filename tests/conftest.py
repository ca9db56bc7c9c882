import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # read when huggingface_hub is imported

import huggingface_hub.constants as hf_constants  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes more than about 5 s on two CPU cores (deselect with -m "not slow")')


@pytest.fixture(scope='session', autouse=True)
def _cpu_kernel_built():
    """Build the fused engine's CPU kernel once, before any test (its first build prints a line to stderr,
    which must not land in the output of a command under test). A failed build leaves the torch code."""
    from sequencer.fast import cpu_kernel
    cpu_kernel.load()
    yield


@pytest.fixture(scope='session', autouse=True)
def _engine_rule_table_in_shared_fixtures(tmp_path_factory):
    """The same for module- and session-scoped fixtures (a reference training run, say), which are set up before
    the per-test fixture below: without it they would measure (and choose, on processors where MKL and oneDNN are
    close, other GEMM backends than the tests' subprocesses, which run by the rule table) and write to the user's
    cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv('SEQUENCER_AUTOTUNE', '0')
    patch.setenv('SEQUENCER_CACHE_DIR', str(tmp_path_factory.mktemp('sequencer_cache')))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _engine_rule_table(tmp_path, monkeypatch):
    """'auto' decides by the rule table (``sequencer.fast.rules``), without timing layers on first use, and
    nothing is cached outside the test's directory. tests/test_autotune.py turns the measuring back on."""
    monkeypatch.setenv('SEQUENCER_AUTOTUNE', '0')
    monkeypatch.setenv('SEQUENCER_CACHE_DIR', str(tmp_path / 'sequencer_cache'))
    yield


@pytest.fixture(autouse=True)
def _offline_caches(tmp_path, monkeypatch):
    """Every test gets empty torch-hub and Hugging Face caches and no network for the hub."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hf_home' / 'hub'))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'hf_home' / 'hub'))
    torch.hub.set_dir(str(tmp_path / 'torch_home' / 'hub'))
    yield


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Give every parameter non-trivial random values (the zero-initialised head included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture
def rand_state():
    return randomize


@pytest.fixture
def packing():
    """Packing on for one test (oneDNN forced), off and forgotten after it."""
    from sequencer.fast import gemm
    gemm.set_backend('onednn')
    gemm.set_packing(True)
    gemm.clear_packed()
    yield
    gemm.set_packing(None)
    gemm.set_backend(None)
    gemm.clear_packed()
