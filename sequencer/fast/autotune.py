"""The 'auto' engine's measured choice: time the candidates once per layer shape, remember the winner on disk.

Why measure: which of the fused recurrence and ``nn.LSTM`` (oneDNN) is faster depends on the processor, not only
on the layer. On most processors the fused CPU kernel wins, but on some (e.g. an AMD EPYC where MKL's sgemm is
slow) the native oneDNN LSTM does, and a fixed rule (``rules.AUTO_RULES``) cannot know. So, as
``torch.backends.cudnn.benchmark`` and Triton's autotuner do, the first time a layer shape runs on a machine,
``choose`` times each candidate for a few steps and keeps the fastest; the choice is cached in memory and on disk,
per processor model and torch version, under a key naming the shape, dtype, grad mode and autocast. Later calls
and later processes read it back and measure nothing.

* What is measured: after one warm-up step of each candidate (for a layer: on the first image of the batch, to
  keep library initialisation and JIT compilation out), rounds of one step per candidate, their order
  alternating (so that both meet the same noise), until ``steps`` rounds are done or ``budget_s`` seconds are
  spent, at least one round; each candidate's best time decides (noise only ever adds time). A layer's step is
  its own forward, and backward when computing gradients: for Sequencer2D-S at batch 8 on 2 CPU cores a
  forward of the first stage's BiLSTM2D takes 0.3 - 1 s, so that layer gets one round and small ones three.
* Where: ``$SEQUENCER_CACHE_DIR/autotune.json``, else ``~/.cache/sequencer/autotune.json``; written atomically
  (temp file + rename). A corrupt file is ignored (and replaced on the next write); an unwritable one leaves the
  choices in memory.
* Switches: ``SEQUENCER_AUTOTUNE=0`` turns measuring off (the rule table decides alone, the cache is not read).
  To force an engine, set it: ``sequencer.fast.set_engine(model, 'fused')`` or ``'native'`` (``--rnn-engine``
  in the commands; 'native' also turns the other fusions off, while ``layer.engine = 'native'`` on a
  ``FastRNN2D`` forces only its recurrence). ``clear_cache()`` / ``sequencer autotune --clear`` forget every
  choice.
* Under DDP each process measures for itself; the engines agree to float32 rounding, so ranks that happen to
  choose differently still train the same model.
* On CUDA the same holds where the fused engine has its Triton kernels (eager training and inference, any
  autocast), with the device synchronised around each timed step; the section is the GPU's name.
* The GEMM backend of the fast engine's CPU GEMMs (MKL or oneDNN, ``gemm``) is a choice of the same kind, made
  per GEMM kind before a layer is measured, and named in the layer's key.
* Where measuring never happens (the rule table decides): torch.compile / export / tracing, torch.func
  transforms, dispatch modes (FLOP counting, fake tensors), hooked layers, CPU weights other than float32, CUDA
  without Triton (see ``FastRNN2D.engine_decision``).
"""
import json
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import torch
from torch import nn

from ..errors import UserError
from . import cpu_kernel

ENV = 'SEQUENCER_AUTOTUNE'
CACHE_ENV = 'SEQUENCER_CACHE_DIR'
FORMAT = 1

_lock = threading.RLock()
_memory: Dict[tuple, str] = {}    # (section, key) -> chosen name
_state = threading.local()        # .measuring: a choice is being measured in this thread
_warned = {'write': False}


# ---- where, and for which processor ---------------------------------------------------------------------------

def enabled() -> bool:
    """False when ``SEQUENCER_AUTOTUNE`` is 0 / false / no / off."""
    return os.environ.get(ENV, '1').strip().lower() not in ('0', 'false', 'no', 'off')


def measuring() -> bool:
    """Whether this thread is inside a measurement (the candidates must not ask for another)."""
    return getattr(_state, 'measuring', False)


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / '.cache' / 'sequencer') / 'autotune.json'


_PROCESSOR: Dict[str, str] = {}


def processor_id(device: str = 'cpu') -> str:
    """The processor's model: /proc/cpuinfo's 'model name' with its family and model numbers and its x86-64 level
    (v3: AVX2 + FMA, v4: AVX-512) and any instruction-set limits set in the environment
    (``cpu_kernel.ISA_LIMITS``) on CPU, ``torch.cuda.get_device_name`` on CUDA."""
    if device not in _PROCESSOR:
        if device == 'cuda':
            name = torch.cuda.get_device_name()
        else:
            name = cpu_kernel.cpu_description()
            level = cpu_kernel.cpu_level()
            if level:
                name += f" [{level.replace('_', '-')}]"
            limits = cpu_kernel.isa_limits()
            if limits:   # libraries held to a lower instruction set choose differently: a section of their own
                name += ' [' + ', '.join(f'{k}={v}' for k, v in sorted(limits.items())) + ']'
        _PROCESSOR[device] = name
    return _PROCESSOR[device]


def _section(device: str) -> str:
    return f"{processor_id(device)} | torch {torch.__version__}"


# ---- the file ---------------------------------------------------------------------------------------------

def _read() -> dict:
    """The cache file's entries ({section: {key: {'choice': name, 'ms': {name: ms}}}}); {} when it is missing,
    unreadable or not ours."""
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    entries = data.get('entries') if isinstance(data, dict) and data.get('format') == FORMAT else None
    if not isinstance(entries, dict):
        return {}
    return {s: keys for s, keys in entries.items() if isinstance(keys, dict)}


def _write(section: str, key: str, entry: dict) -> None:
    """Add one entry to the file (merged with what other processes wrote), atomically; on failure warn once and
    keep the choice in memory only."""
    path = cache_path()
    entries = _read()
    entries.setdefault(section, {})[key] = entry
    tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({'format': FORMAT, 'entries': entries}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if not _warned['write']:
            _warned['write'] = True
            warnings.warn(f"sequencer: cannot write the autotune cache {path} ({e}); choices are kept in memory")


def _cached(section: str, key: str) -> Optional[str]:
    if (section, key) not in _memory:
        entry = _read().get(section, {}).get(key)
        if isinstance(entry, dict) and isinstance(entry.get('choice'), str):
            _memory[(section, key)] = entry['choice']
    return _memory.get((section, key))


def cached_choice(key: str, device: str = 'cpu') -> Optional[str]:
    """The choice cached for ``key`` on this processor (in this process or on disk), or None."""
    with _lock:
        return _cached(_section(device), key)


def clear_cache() -> bool:
    """Forget every choice, in memory and on disk; whether a cache file was removed."""
    with _lock:
        _memory.clear()
        try:
            cache_path().unlink()
            return True
        except FileNotFoundError:
            return False


def choices(device: str = 'cpu') -> Dict[str, str]:
    """key -> chosen engine, for this processor and torch version (the file's and this process's)."""
    section = _section(device)
    with _lock:
        out = {k: e['choice'] for k, e in _read().get(section, {}).items()
               if isinstance(e, dict) and isinstance(e.get('choice'), str)}
        out.update({k: c for (s, k), c in _memory.items() if s == section})
    return out


# ---- the choice -------------------------------------------------------------------------------------------

def time_call(name: str, fn: Callable[[], object], device: str = 'cpu') -> float:
    """Seconds one call of ``fn`` takes (the default timer; ``name`` is for injected timers)."""
    if device == 'cuda':
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def choose(key: str, candidates: Mapping[str, Callable[[], object]], timer: Optional[Callable] = None,
           steps: int = 3, budget_s: float = 1.0, device: str = 'cpu',
           warmup: Optional[Mapping[str, Callable[[], object]]] = None) -> str:
    """The fastest of ``candidates`` (name -> a zero-argument callable running one step) for ``key`` on this
    processor: the cached choice if there is one, else measured now and cached.

    ``warmup`` (name -> callable, e.g. the step on a smaller input) runs once per candidate before the timing, so
    that first-call costs (library initialisation, JIT compilation) stay out of it. ``timer(name, fn)`` returns
    the seconds one call of ``fn`` took (default ``time_call``; tests inject their own). Rounds of one call per
    candidate, alternating their order, run until ``steps`` rounds or ``budget_s`` seconds (as the timer counts
    them) are spent, at least one round; each candidate's best time decides.
    """
    section = _section(device)
    with _lock:
        cached = _cached(section, key)
        if cached in candidates:
            return cached
        timer = timer if timer is not None else (lambda name, fn: time_call(name, fn, device))
        names = list(candidates)
        samples: Dict[str, list] = {n: [] for n in names}
        spent = 0.0
        outer = measuring()   # a choice made while another is measured (its warm-up) restores the flag
        _state.measuring = True
        try:
            for n in names:
                if warmup is not None and n in warmup:
                    warmup[n]()
            for r in range(max(1, steps)):
                for n in (names if r % 2 == 0 else names[::-1]):
                    t = float(timer(n, candidates[n]))
                    samples[n].append(t)
                    spent += t
                if spent >= budget_s:
                    break
        finally:
            _state.measuring = outer
        best = {n: min(ts) for n, ts in samples.items()}
        choice = min(names, key=best.__getitem__)
        _memory[(section, key)] = choice
        _write(section, key, {'choice': choice, 'ms': {n: round(t * 1e3, 3) for n, t in best.items()}})
        return choice


# ---- reporting ------------------------------------------------------------------------------------------------

def describe(model: nn.Module) -> str:
    """What the model's BiLSTM2D layers chose so far, for a log line, e.g.
    ``auto: train: fused x 12 (measured), native x 4 (measured); infer: native x 16 (measured)``
    ('train' / 'infer': computing gradients or not, followed by the autocast dtype if any; '(measured)': by
    ``choose``; '(rule)': by the rule table, e.g. compiled or with ``SEQUENCER_AUTOTUNE=0``; '(set)': forced by
    ``set_engine``)."""
    layers = [m for m in model.modules() if callable(getattr(m, 'engine_decision', None))]
    if not layers:
        return 'native'
    modes: Dict[str, Dict[tuple, int]] = {}
    forced: Dict[tuple, int] = {}
    for m in layers:
        if m.engine != 'auto':
            forced[(m.engine, 'set')] = forced.get((m.engine, 'set'), 0) + 1
            continue
        for mode, decision in m.__dict__.get('_decisions', {}).items():
            counts = modes.setdefault(mode, {})
            counts[decision] = counts.get(decision, 0) + 1

    def listed(counts):
        return ', '.join(f"{e} x {n} ({how})" for (e, how), n in sorted(counts.items(), key=lambda i: -i[1]))

    parts = [f"{mode}: {listed(counts)}" for mode, counts in sorted(modes.items())]
    if any(m.engine == 'auto' for m in layers) and not modes:
        parts.append('not run eagerly yet')   # compiled graphs: the rule table
    text = ('auto: ' + '; '.join(parts)) if parts else ''
    if forced:
        text += ('; ' if text else '') + listed(forced)
    return text


# ---- `sequencer autotune` ---------------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument('--clear', action='store_true', help='forget every measured choice (delete the cache file)')


def run(args) -> int:
    path = cache_path()
    if args.clear:
        try:
            print(f"removed {path}" if clear_cache() else f"no cache at {path}")
        except OSError as e:
            raise UserError(f"cannot remove {path}: {e.strerror or e}") from None
        return 0
    print(f"cache: {path}{'' if path.exists() else ' (none yet)'}")
    print(f"processor: {_section('cpu')}")
    if not enabled():
        print(f"measuring is off ({ENV}=0): the rule table decides")
    cached = _read().get(_section('cpu'), {})
    for key, entry in sorted(cached.items()):
        ms = entry.get('ms') if isinstance(entry, dict) else None
        times = ', '.join(f"{n} {t} ms" for n, t in ms.items()) if isinstance(ms, dict) else 'no times'
        print(f"  {key}: {entry.get('choice') if isinstance(entry, dict) else entry} ({times})")
    if not cached:
        print("  no choices cached for this processor yet")
    return 0
