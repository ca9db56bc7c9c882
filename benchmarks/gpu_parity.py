"""Does the fused engine train like nn.LSTM on a GPU? Loss curves of Sequencer2D-S under bf16 autocast, three ways.

    python benchmarks/gpu_parity.py [--steps 240] [--batch-size 64] [--native-seeds 0 1 2] [--plot docs/gpu-parity.png]
    python benchmarks/gpu_parity.py --device cpu --layers 1,1,1,1 --img-size 32 --steps 4 --batch-size 4 --window 2

What it proves. Three arms train the same network from the same initial weights with the same recipe: ours on
the 'fused' engine (Triton kernels on CUDA), ours on the 'native' engine (``nn.LSTM``, cuDNN), and timm's
``sequencer2d_s`` (the reference implementation). The task is the embedded digits (``sequencer.data.demo``, the
80 % training split, 10 classes), upsampled to ``--img-size`` on the device, held there as one tensor (no loader);
AdamW (timm's optimizer factory) at a fixed learning rate, no warm-up, no schedule, no augmentation, no dropout or
drop-path, plain cross-entropy. What varies from one seed to the next is only the order in which the examples are
drawn (one shuffle per pass over the data, from ``torch.Generator().manual_seed(seed)``); the initial weights
(``--init-seed``) are the same for every run. Native's runs over several seeds give the seed-to-seed envelope of
ordinary training noise; fused and timm, each run with one of native's seeds (by default seed 0: the same data
order as native's seed-0 run), pass when their loss stays inside that envelope.

The verdict, per step window (``--window`` steps, default 20; the mean loss of each window): the envelope is
native's min..max over seeds, widened on each side by ``--tol-spread`` x (max - min) + ``--tol-level`` x native's
mean (defaults 1.0 and 0.05: with three seeds min..max is a narrow sample of the seed-to-seed spread, and a run
that learns as native does must not fail by chance in one of 15 windows; a wrong gradient shows as a curve that
leaves the band for good). An arm passes when every window's mean lies inside the widened envelope.

The JSON (default ``benchmarks/results/gpu-<device name, lower case, dashed>-parity.json``; on the CPU
``cpu-<processor>-parity.json``), rewritten after every run so an interrupted session keeps what finished:
  config       every setting of this run (model, image size, batch, steps, lr, seeds, window, tolerances)
  environment  date, versions (sequencer, torch, timm, triton, CUDA, cuDNN), device name, fused implementation
  runs         one entry per run: arm, seed, loss (one value per step), seconds, steps_per_s, val_top1
  verdict      windows ([start, end) step ranges), native_min / native_max / native_mean per window, and for each
               other run (e.g. 'fused seed 0'): its window means, inside (per window), n_outside, max_excess (largest
               distance outside native's raw min..max; 0 when inside), max_dev_mean (largest |arm - native mean|),
               max_dev_same_seed (largest |arm - native's run of the same seed|, when there is one), passed;
               'passed' at the top: every compared run passed (null when only native ran).
The exit status is 0 when the verdict passes, 1 when it does not (the JSON is written either way).

Time: five runs of 240 steps at batch 64. Each run prints its seconds and its steady steps/s (the first fused run's
seconds include compiling and autotuning the Triton kernels); scale --steps or --batch-size from those figures.
"""
import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.optim import create_optimizer_v2

from sequencer import create_model
from sequencer.analysis.benchmark import environment
from sequencer.data.demo import write_digits
from sequencer.engine.io import write_text
from sequencer.fast import cpu_kernel
from sequencer.fast.runtime import triton_ok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = 'sequencer2d_s'
ARMS = ('native', 'fused', 'timm')
NUM_CLASSES = 10


# ---- data -----------------------------------------------------------------------------------------------------

def load_digits(device: torch.device) -> Dict[str, torch.Tensor]:
    """The demo's digits (its 32 px grey PNGs and its train / val split) as uint8 tensors on ``device``:
    {'train_x': (N, 1, 32, 32), 'train_y': (N,), 'val_x', 'val_y'}."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_digits(os.path.join(tmp, 'digits'))
        for split in ('train', 'val'):
            xs, ys = [], []
            for label in sorted(os.listdir(os.path.join(root, split)), key=int):
                folder = os.path.join(root, split, label)
                for name in sorted(os.listdir(folder)):
                    with Image.open(os.path.join(folder, name)) as img:
                        xs.append(np.asarray(img.convert('L'), dtype=np.uint8))
                    ys.append(int(label))
            out[f'{split}_x'] = torch.from_numpy(np.stack(xs)).unsqueeze(1).to(device)
            out[f'{split}_y'] = torch.tensor(ys, dtype=torch.long, device=device)
    return out


def images(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 1, h, w) -> float (B, 3, size, size), bilinear, normalised as the demo does (mean = std = 0.5)."""
    x = x.float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    return x.sub_(0.5).div_(0.5).expand(-1, 3, -1, -1)


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """(steps, batch_size) example indices: consecutive shuffles of range(n) drawn from ``seed``, cut into batches."""
    g = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    perms = [torch.randperm(n, generator=g) for _ in range(-(-need // n))]
    return torch.cat(perms)[:need].view(steps, batch_size)


# ---- models -----------------------------------------------------------------------------------------------------

def build(arm: str, layers: Optional[Sequence[int]], state: Dict[str, torch.Tensor], device: torch.device):
    """The model of ``arm`` ('native' / 'fused': ours on that engine; 'timm': timm's) holding ``state``."""
    kwargs = dict(num_classes=NUM_CLASSES)
    if layers is not None:
        kwargs['layers'] = tuple(layers)
    if arm == 'timm':
        if 'layers' in kwargs:
            kwargs['layers'] = list(kwargs['layers'])
        model = timm.create_model(MODEL, pretrained=False, **kwargs)
    else:
        model = create_model(MODEL, rnn_engine=arm, **kwargs)
    model.load_state_dict(state, strict=True)   # the layouts are the same: every key must match
    return model.to(device).train()


def initial_state(layers: Optional[Sequence[int]], seed: int) -> Dict[str, torch.Tensor]:
    """The initial weights every run starts from: our plain model's initialisation under ``seed``."""
    torch.manual_seed(seed)
    kwargs = dict(num_classes=NUM_CLASSES) | (dict(layers=tuple(layers)) if layers is not None else {})
    model = create_model(MODEL, rnn_engine='native', **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- one run ----------------------------------------------------------------------------------------------------

def _sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def train_run(arm: str, seed: int, data: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor], a,
              device: torch.device, log=print) -> Dict:
    """Train one arm from ``state`` for ``a.steps`` steps with the data order of ``seed``; the per-step losses."""
    label = f'{arm} seed {seed}'
    model = build(arm, a.layers, state, device)
    opt = create_optimizer_v2(model, 'adamw', lr=a.lr, weight_decay=a.weight_decay)
    order = batch_order(len(data['train_y']), a.steps, a.batch_size, seed).to(device)
    losses = torch.zeros(a.steps, device=device)
    skip = min(5, a.steps - 1)   # steps not counted in the steady rate (kernel compilation, autotuning)
    _sync(device)
    t0 = time.perf_counter()
    t_skip = t0
    for step in range(a.steps):
        idx = order[step]
        x = images(data['train_x'][idx], a.img_size)
        y = data['train_y'][idx]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not a.fp32):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses[step] = loss.detach()
        if step + 1 == skip:
            _sync(device)
            t_skip = time.perf_counter()
        if (step + 1) % a.log_every == 0 and step + 1 < a.steps:
            recent = losses[max(0, step + 1 - a.window):step + 1].mean().item()   # the host reads the loss here
            rate = (step + 1) / (time.perf_counter() - t0)
            log(f'  {label}: step {step + 1}/{a.steps}  loss (last {a.window}) {recent:.4f}  {rate:.1f} steps/s',
                flush=True)
    _sync(device)
    took = time.perf_counter() - t0
    curve = losses.tolist()
    steady = (a.steps - skip) / max(time.perf_counter() - t_skip, 1e-9) if a.steps > skip else None
    top1 = evaluate(model, data, a, device)
    del model, opt
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    r = {'arm': arm, 'seed': seed, 'loss': curve, 'seconds': round(took, 2),
         'steps_per_s': round(steady, 2) if steady else None, 'val_top1': round(top1, 2)}
    log(f'{label}: {a.steps} steps in {took:.1f} s ({r["steps_per_s"]} steps/s after the first {skip})  '
        f'loss {statistics.mean(curve[:a.window]):.4f} -> {statistics.mean(curve[-a.window:]):.4f} '
        f'(first / last {a.window} steps)  val top-1 {top1:.2f}%', flush=True)
    return r


@torch.no_grad()
def evaluate(model, data: Dict[str, torch.Tensor], a, device: torch.device) -> float:
    """Top-1 (%) on the demo's validation split, under the run's autocast."""
    model.eval()
    correct = 0
    n = len(data['val_y'])
    for i in range(0, n, a.eval_batch_size):
        x = images(data['val_x'][i:i + a.eval_batch_size], a.img_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not a.fp32):
            pred = model(x).argmax(-1)
        correct += (pred == data['val_y'][i:i + a.eval_batch_size]).sum().item()
    model.train()
    return 100.0 * correct / max(n, 1)


# ---- verdict ----------------------------------------------------------------------------------------------------

def windows(n: int, window: int) -> List[List[int]]:
    """[start, end) step ranges of ``window`` steps covering range(n); the last one may be shorter."""
    return [[s, min(s + window, n)] for s in range(0, n, window)]


def window_means(curve: Sequence[float], window: int) -> List[float]:
    return [float(statistics.fmean(curve[s:e])) for s, e in windows(len(curve), window)]


def verdict(runs: Sequence[Dict], window: int, tol_spread: float, tol_level: float) -> Dict:
    """Each non-native run's window means against native's seed-to-seed envelope (see the module docstring).

    ``runs``: dicts with 'arm', 'seed' and 'loss' (per-step losses, all the same length). A window is inside when
    lo - m <= mean <= hi + m, with lo / hi native's min / max over seeds and m = tol_spread x (hi - lo) +
    tol_level x |native's mean|. A non-finite loss is never inside."""
    native = [r for r in runs if r['arm'] == 'native']
    if not native:
        raise ValueError('the verdict needs at least one native run')
    n = len(native[0]['loss'])
    if any(len(r['loss']) != n for r in runs):
        raise ValueError('every run must have as many steps as the others')
    spans = windows(n, window)
    nat = {r['seed']: window_means(r['loss'], window) for r in native}
    cols = list(zip(*nat.values()))
    lo = [min(c) for c in cols]
    hi = [max(c) for c in cols]
    mean = [statistics.fmean(c) for c in cols]
    margin = [tol_spread * (h - low) + tol_level * abs(m) for low, h, m in zip(lo, hi, mean)]
    compared = {}
    for r in runs:
        if r['arm'] == 'native':
            continue
        w = window_means(r['loss'], window)
        inside = [math.isfinite(v) and low - m <= v <= h + m for v, low, h, m in zip(w, lo, hi, margin)]
        excess = [max(low - v, v - h, 0.0) if math.isfinite(v) else math.inf for v, low, h in zip(w, lo, hi)]
        dev_mean = [abs(v - m) if math.isfinite(v) else math.inf for v, m in zip(w, mean)]
        same = nat.get(r['seed'])
        entry = {'arm': r['arm'], 'seed': r['seed'], 'window_means': w, 'inside': inside,
                 'n_outside': inside.count(False), 'max_excess': max(excess), 'max_dev_mean': max(dev_mean),
                 'max_dev_same_seed': (max(abs(v - s) if math.isfinite(v) else math.inf for v, s in zip(w, same))
                                       if same is not None else None),
                 'passed': all(inside)}
        compared[f"{r['arm']} seed {r['seed']}"] = entry
    return {'window': window, 'tol_spread': tol_spread, 'tol_level': tol_level,
            'native_seeds': sorted(nat), 'windows': spans, 'native_min': lo, 'native_max': hi, 'native_mean': mean,
            'margin': margin, 'max_native_spread': max(h - low for low, h in zip(lo, hi)), 'runs': compared,
            'passed': all(e['passed'] for e in compared.values()) if compared else None}


def _finite(obj):
    """JSON has no inf / nan: those become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ---- output -----------------------------------------------------------------------------------------------------

def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the rule of benchmarks/gpu.sh)."""
    s = re.sub(r'\((r|tm)\)', '', name.lower())
    return re.sub(r'[^a-z0-9]+', '-', s).strip('-') or 'unknown'


def default_results(device: torch.device) -> str:
    env = environment(device)
    prefix = 'gpu' if device.type == 'cuda' else device.type
    return os.path.join(ROOT, 'benchmarks', 'results', f"{prefix}-{slug(env['device_name'])}-parity.json")


def versions(device: torch.device) -> Dict:
    env = environment(device)
    try:
        import triton
        env['triton'] = triton.__version__
    except ImportError:
        env['triton'] = None
    env['cuda'] = torch.version.cuda
    env['cudnn'] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if device.type == 'cuda':
        env['fused_impl'] = 'triton' if triton_ok() else 'torch'
    else:
        env['fused_impl'] = 'kernel' if cpu_kernel.available() else 'torch'
    return env


def plot(result: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    v = result['verdict']
    cfg = result['config']
    colors = {'native': 'tab:blue', 'fused': 'tab:orange', 'timm': 'tab:green'}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    seen = set()
    for r in result['runs']:
        a.plot(r['loss'], color=colors[r['arm']], alpha=0.5, lw=0.8,
               label=None if r['arm'] in seen else r['arm'])
        seen.add(r['arm'])
    a.set(xlabel='step', ylabel='training loss', title='per-step loss, one line per run', yscale='log')
    a.legend()
    mid = [(s + e - 1) / 2 for s, e in v['windows']]
    low = [max(lo - m, 0.5 * lo) for lo, m in zip(v['native_min'], v['margin'])]   # log scale: kept above 0
    high = [hi + m for hi, m in zip(v['native_max'], v['margin'])]
    b.fill_between(mid, low, high, color=colors['native'], alpha=0.15, label='native envelope, widened')
    b.fill_between(mid, v['native_min'], v['native_max'], color=colors['native'], alpha=0.35,
                   label=f"native min..max ({len(v['native_seeds'])} seeds)")
    for name, e in v['runs'].items():
        finite = [m if math.isfinite(m) else math.nan for m in e['window_means']]
        b.plot(mid, finite, 'o-', ms=3, color=colors[e['arm']], label=name)
    b.set(xlabel='step', ylabel=f"mean loss per {v['window']} steps", title='window means against the envelope',
          yscale='log')
    b.legend(fontsize=8)
    layers = f" layers {','.join(map(str, cfg['layers']))}" if cfg['layers'] else ''
    fig.suptitle(f"{cfg['model']}{layers} {cfg['img_size']} px, {'fp32' if cfg['fp32'] else 'bf16 autocast'}, batch "
                 f"{cfg['batch_size']}, {result['environment']['device_name']}: verdict "
                 f"{({True: 'pass', False: 'FAIL', None: 'nothing compared'})[v['passed']]}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _layers(text: str) -> List[int]:
    try:
        layers = [int(t) for t in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected four comma-separated block counts, got {text!r}') from None
    if len(layers) != 4 or min(layers) < 1:
        raise argparse.ArgumentTypeError(f'expected four positive block counts, got {text!r}')
    return layers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--device', default='cuda', help="'cuda' (the point of this script) or 'cpu' (testing)")
    p.add_argument('--steps', type=int, default=240)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--eval-batch-size', type=int, default=256, help='batch of the final validation pass')
    p.add_argument('--img-size', type=int, default=224, help='the 32 px digits are upsampled to this')
    p.add_argument('--layers', type=_layers, default=None, help="blocks per stage, e.g. 1,1,1,1 (default: "
                                                                "Sequencer2D-S's 4,3,8,3)")
    p.add_argument('--lr', type=float, default=2e-4)
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--fp32', action='store_true', help='no autocast (default: bf16 autocast)')
    p.add_argument('--init-seed', type=int, default=0, help='the initial weights, the same for every run')
    p.add_argument('--native-seeds', type=int, nargs='+', default=[0, 1, 2], help='data orders for native')
    p.add_argument('--fused-seeds', type=int, nargs='*', default=[0], help='data orders for fused')
    p.add_argument('--timm-seeds', type=int, nargs='*', default=[0], help="data orders for timm's model")
    p.add_argument('--window', type=int, default=20, help='steps per window of the verdict')
    p.add_argument('--tol-spread', type=float, default=1.0, help="widening, as a fraction of native's min..max")
    p.add_argument('--tol-level', type=float, default=0.05, help="widening, as a fraction of native's mean loss")
    p.add_argument('--log-every', type=int, default=50, help='steps between progress lines')
    p.add_argument('--results', default=None, help='the JSON file (default: benchmarks/results/gpu-<GPU>-parity.json)')
    p.add_argument('--plot', default=None, metavar='PATH', help='also write a plot (e.g. docs/gpu-parity.png)')
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    for name in ('steps', 'batch_size', 'eval_batch_size', 'img_size', 'window', 'log_every'):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    device = torch.device(a.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda: no CUDA device here (use --device cpu for a test run)')
    results = a.results or default_results(device)
    env = versions(device)
    config = {'model': MODEL, 'layers': a.layers, 'num_classes': NUM_CLASSES, 'img_size': a.img_size,
              'batch_size': a.batch_size, 'steps': a.steps, 'fp32': a.fp32, 'autocast': None if a.fp32 else 'bfloat16',
              'optimizer': 'adamw (timm create_optimizer_v2: no weight decay on biases and norms)', 'lr': a.lr,
              'weight_decay': a.weight_decay, 'init_seed': a.init_seed, 'native_seeds': a.native_seeds,
              'fused_seeds': a.fused_seeds, 'timm_seeds': a.timm_seeds, 'window': a.window,
              'tol_spread': a.tol_spread, 'tol_level': a.tol_level,
              'data': "sequencer.data.demo digits, train split, 32 px grey upsampled bilinear, mean = std = 0.5",
              'varies_with_seed': 'data order only (a shuffle per pass over the training split)'}
    print(f"{env['device_name']}: {MODEL} layers {a.layers or 'default'}, {a.img_size} px, batch {a.batch_size}, "
          f"{a.steps} steps, {'fp32' if a.fp32 else 'bf16 autocast'}, fused engine: {env['fused_impl']}", flush=True)
    data = load_digits(device)
    state = initial_state(a.layers, a.init_seed)
    plan = [('native', a.native_seeds[0])] + [('fused', s) for s in a.fused_seeds] + \
           [('timm', s) for s in a.timm_seeds] + [('native', s) for s in a.native_seeds[1:]]
    runs = []
    result = {}
    t_start = time.perf_counter()
    for arm, seed in plan:
        runs.append(train_run(arm, seed, data, state, a, device))
        result = {'config': config, 'environment': env, 'runs': runs,
                  'verdict': verdict(runs, a.window, a.tol_spread, a.tol_level)}
        write_text(results, json.dumps(_finite(result), indent=1) + '\n')
    v = result['verdict']
    print(f"{len(runs)} runs in {time.perf_counter() - t_start:.0f} s")
    print(f"\nnative envelope over seeds {v['native_seeds']}: largest min..max spread {v['max_native_spread']:.4f} "
          f"(windows of {a.window} steps, widened by {a.tol_spread} x spread + {a.tol_level} x mean)")
    for name, e in v['runs'].items():
        same = (f", max |dev| from native seed {e['seed']} {e['max_dev_same_seed']:.4f}"
                if e['max_dev_same_seed'] is not None else '')
        print(f"{name}: {len(e['inside']) - e['n_outside']}/{len(e['inside'])} windows inside, max excess "
              f"{e['max_excess']:.4f}, max |dev| from native mean {e['max_dev_mean']:.4f}{same}: "
              f"{'pass' if e['passed'] else 'FAIL'}")
    print(f"verdict: {({True: 'pass', False: 'FAIL', None: 'nothing compared'})[v['passed']]}\nresults {results}")
    if a.plot:
        plot(result, a.plot)
        print(f"plot {a.plot}")
    return 1 if v['passed'] is False else 0


if __name__ == '__main__':
    sys.exit(main())
