"""Training: setup, one epoch, evaluate and checkpoint; readable top to bottom, standing on timm's factories.

Run with ``sequencer train ...``, ``python train.py ...`` or ``./distributed_train.sh NUM_PROC ...``
(torchrun, DDP). The flags are timm's train.py flags with the same meanings.

``train(args)`` is ``setup`` (data, model, optimizer, run folder, resuming), then for every epoch
``train_one_epoch`` and ``evaluate_and_checkpoint``. Under DDP with ``--grad-accum-steps`` only the last
micro-step of an update synchronises gradients (``no_sync``); the loss is summed on the device and read on the
host only when it is logged (every ``--log-interval`` steps) or saved, and at the end of the epoch.

A run folder (``--output``/``--experiment``) receives args.yaml, summary.csv, log.txt, train_curve.png,
last.pth.tar, the best ``--checkpoint-hist`` checkpoints (checkpoint-<epoch>.pth.tar) and
model_best.pth.tar. Every file is written atomically, and an epoch's checkpoint before its row in summary.csv.
A checkpoint holds everything needed to continue exactly where it was written: model, optimizer, loss scaler,
scheduler, EMA, position in the epoch, RNG states and the summary so far, so that a resumed run ends with the
same weights and summary rows as one never interrupted (on CPU with a fixed seed).
"""
import contextlib
import csv
import importlib.util
import io
import math
import os
import random
import signal
import sys
import time
from datetime import datetime
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch.nn.parallel import DistributedDataParallel as DDP

from ..data.datasets import (
    Prefetched,
    RepeatAugShards,
    Samples,
    ShardSampler,
    SplitErasing,
    build_dataset,
    class_difference,
    class_names_of,
    make_loader,
    num_classes_of,
)
from ..data.device_augment import DeviceAugment, Plan
from ..data.images import IMAGE_MODES, image_mode
from ..data.loaders import check_input_size, fit_channels, posterize_keeps_zero_bits
from ..errors import UserError, first_line
from ..fast import autotune, gemm
from ..models import get_spec, load_checkpoint
from ..models.weights import CheckpointError, load_state_dict, read_file, unwrap
from .args import build_train_parser, parse
from .evaluate import autocast, check_compile_flags, evaluate, torch_compile
from .io import check_output, save_torch, write_text
from .loading import create_model_checked, resolve_device
from .malloc import keep_freed_memory

SUMMARY_FIELDS = ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']
CHECKPOINT_VERSION = 1


# ---- set-up helpers ---------------------------------------------------------------------------------------
class Dist:
    """Where this process stands: rank, world size, device."""

    def __init__(self, device_arg: Optional[str]):
        self.world = int(os.environ.get('WORLD_SIZE', 1))
        self.rank = int(os.environ.get('RANK', 0))
        self.local_rank = int(os.environ.get('LOCAL_RANK', 0))
        want_cuda = resolve_device(device_arg, mps=False).type == 'cuda'   # cpu or cuda, else one line
        if want_cuda:
            self.device = torch.device('cuda', self.local_rank if self.world > 1 else torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device('cpu')
            if self.world > 1:  # share the cores between the local processes
                local_world = int(os.environ.get('LOCAL_WORLD_SIZE', self.world))
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group('nccl' if want_cuda else 'gloo')
        self.main = self.rank == 0

    def all_max(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def all_sum(self, *values: float) -> List[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def read(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> List[float]:
        """The values of a device tensor, reduced over the ranks (``op``), on the host."""
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t, op=op)
        return t.tolist()


class Log:
    """Lines to stdout and log.txt (main process only)."""

    def __init__(self, main: bool):
        self.main, self.file = main, None
        self.early: List[str] = []   # lines said before log.txt was opened, written to it when it is

    def open(self, path: str):
        if self.main:
            self.file = open(path, 'a', buffering=1)
            self.file.writelines(self.early)
            self.early = []

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def __call__(self, msg: str):
        if not self.main:
            return
        print(msg, flush=True)
        line = f"{datetime.now():%Y-%m-%d %H:%M:%S} {msg}\n"
        if self.file:
            self.file.write(line)
        elif len(self.early) < 1000:
            self.early.append(line)


def amp_dtype_for(args, device: torch.device, log: Log) -> Optional[torch.dtype]:
    if not args.amp:
        return None
    name = args.amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16')
    if device.type == 'cpu' and not args.amp_dtype:
        log("--amp on CPU: using bfloat16 autocast (float16 loss scaling is a GPU feature)")
    return getattr(torch, name)


def build_model(args, num_classes: int, dist_: Dist, log: Log):
    kwargs = dict(args.model_kwargs or {})
    if args.drop_path is not None:
        kwargs['drop_path_rate'] = args.drop_path
    if args.gp:
        kwargs['global_pool'] = args.gp
    channels = args.in_chans or (args.input_size[0] if args.input_size else None)
    if channels:
        kwargs['in_chans'] = channels
    size = args.input_size[-1] if args.input_size else args.img_size
    if size:
        kwargs['img_size'] = size
    model = create_model_checked(args.model, kwargs, f' or --drop {args.drop}',
                                 pretrained=args.pretrained and not args.pretrained_path, num_classes=num_classes,
                                 drop_rate=args.drop, rnn_engine=args.rnn_engine)
    if args.pretrained_path:
        load_checkpoint(model, args.pretrained_path, reset_head=True, adapt_in_chans=True)
    if args.initial_checkpoint:
        load_checkpoint(model, args.initial_checkpoint)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def scaled_lr(args, world: int) -> float:
    """timm's rule: --lr if given, else --lr-base scaled by the global batch (sqrt for adaptive optimizers)."""
    if args.lr is not None:
        return args.lr
    ratio = args.batch_size * world * args.grad_accum_steps / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    return args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)


def rng_state() -> Dict:
    np_state = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'python': random.getstate(),
            'numpy': [np_state[0], np_state[1].tolist(), *np_state[2:]],
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: Dict):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'] if isinstance(state['python'], tuple) else tuple(
        tuple(x) if isinstance(x, list) else x for x in state['python']))
    n = state['numpy']
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if state.get('cuda') and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ---- checkpoints ------------------------------------------------------------------------------------------
def valid_checkpoint(path: str) -> Optional[Dict]:
    """The checkpoint at ``path`` if it is complete and readable, else None."""
    try:
        ckpt = read_file(path)
    except CheckpointError:
        return None
    return ckpt if isinstance(ckpt, dict) and 'state_dict' in ckpt and 'next_epoch' in ckpt else None


def _check_resume_fits(ckpt: Dict, path: str, args, classes: Optional[List[str]], world: int) -> None:
    """A run continues only on what it was trained on: the same optimizer, the same classes in the same order
    (folder order decides which output is which class), and, from the middle of an epoch, the same batch
    geometry (the batches already done are skipped by count)."""
    run = ckpt.get('args') if isinstance(ckpt.get('args'), dict) else {}
    if not args.no_resume_opt and run.get('opt') and str(run['opt']).lower() != str(args.opt).lower():
        raise UserError(f"{path}: the run trained with --opt {run['opt']}, not --opt {args.opt}; resume with "
                        f"--opt {run['opt']}, or pass --no-resume-opt to start the optimizer afresh")
    what = class_difference(ckpt.get('class_names'), classes)
    if what:
        raise UserError(f"{path}: the run trained on other classes ({what}); resume on the run's data, or start a "
                        f"new run from these weights with --initial-checkpoint")
    if ckpt.get('next_batch'):
        saved = (run.get('batch_size'), ckpt.get('world_size', world), run.get('grad_accum_steps', 1))
        if saved != (args.batch_size, world, args.grad_accum_steps):
            raise UserError(f"{path}: saved at batch {ckpt['next_batch']} of epoch {ckpt['next_epoch']} with "
                            f"--batch-size {saved[0]} on {saved[1]} process(es), --grad-accum-steps {saved[2]}; "
                            f"resume it with the same, or resume from the end of an epoch (last.pth.tar)")


def find_resume(folder: str, log: Log) -> Optional[str]:
    """The newest valid checkpoint of a run folder; corrupt ones are named and skipped."""
    if not os.path.isdir(folder):
        return None
    # sorted: of equally new files (model_best is a link to a checkpoint-<epoch>), the same one every time
    names = sorted(n for n in os.listdir(folder) if n.endswith('.pth.tar') and not n.startswith('.'))
    best, best_pos = None, None
    for name in names:
        path = os.path.join(folder, name)
        ckpt = valid_checkpoint(path)
        if ckpt is None:
            log(f"skipping {path}: truncated or corrupt checkpoint")
            continue
        pos = (ckpt['next_epoch'], ckpt.get('next_batch', 0), os.path.getmtime(path))
        if best_pos is None or pos > best_pos:
            best, best_pos = path, pos
    return best


class Keeper:
    """last.pth.tar every time; checkpoint-<epoch>.pth.tar for the best N; model_best.pth.tar."""

    def __init__(self, folder: str, keep: int, decreasing: bool):
        self.folder, self.keep, self.decreasing = folder, keep, decreasing
        self.best: List[List] = []  # [metric, epoch], best first

    def _path(self, name):
        return os.path.join(self.folder, name)

    def _link(self, src: str, dst: str):
        tmp = dst + '.tmp-link'
        if os.path.exists(tmp):
            os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # file systems without hard links
            import shutil
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)

    def save_epoch(self, state: Dict, epoch: int, metric: float):
        # best first; an epoch without a figure (NaN: nothing could be evaluated) ranks below every other
        ranked = sorted(self.best + [[metric, epoch]],
                        key=lambda r: (math.isnan(r[0]), r[0] if self.decreasing else -r[0]))
        kept, dropped = ranked[:self.keep], ranked[self.keep:]
        state['best'] = kept
        last = self._path('last.pth.tar')
        save_torch(state, last)
        if any(e == epoch for _, e in kept):
            self._link(last, self._path(f'checkpoint-{epoch}.pth.tar'))
            if kept[0][1] == epoch:
                self._link(last, self._path('model_best.pth.tar'))
        for _, e in dropped:
            p = self._path(f'checkpoint-{e}.pth.tar')
            if os.path.exists(p):
                os.unlink(p)
        self.best = kept

    def restore_links(self, path: str, epoch: int):
        """Re-create the best-checkpoint files of ``epoch`` that a crash right after saving may have left out."""
        for rank, (_, e) in enumerate(self.best):
            if e != epoch:
                continue
            names = [f'checkpoint-{epoch}.pth.tar'] + (['model_best.pth.tar'] if rank == 0 else [])
            for name in names:
                if not os.path.exists(self._path(name)) and os.path.abspath(path) != os.path.abspath(self._path(name)):
                    self._link(path, self._path(name))

    def save_recovery(self, state: Dict):
        state['best'] = self.best
        save_torch(state, self._path('recovery.pth.tar'))


# ---- outputs ----------------------------------------------------------------------------------------------
def write_summary(folder: str, rows: List[Dict]):
    fields = SUMMARY_FIELDS + sorted({k for r in rows for k in r} - set(SUMMARY_FIELDS))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    write_text(os.path.join(folder, 'summary.csv'), buf.getvalue())


def plot_curves(folder: str, rows: List[Dict]):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from .io import write_with
    ep = [r['epoch'] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [float(r['train_loss']) for r in rows], 'o-', label='train loss')
    a.plot(ep, [float(r['eval_loss']) for r in rows], 's-', label='eval loss')
    a.set_xlabel('epoch'), a.set_ylabel('loss'), a.legend(), a.grid(alpha=.3)
    b.plot(ep, [float(r['eval_top1']) for r in rows], 'o-', label='eval top-1')
    b.plot(ep, [float(r['eval_top5']) for r in rows], 's-', label='eval top-5')
    b.set_xlabel('epoch'), b.set_ylabel('accuracy (%)'), b.legend(), b.grid(alpha=.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=100)
    plt.close(fig)
    write_with(os.path.join(folder, 'train_curve.png'), lambda f: f.write(buf.getvalue()))


def run_folder(args, resume_path: str) -> str:
    if resume_path and resume_path != 'auto' and not args.experiment and not args.output:
        return os.path.dirname(os.path.abspath(resume_path))
    root = args.output or os.path.join('output', 'train')
    if args.experiment:
        return os.path.join(root, args.experiment)
    size = args.input_size[-1] if args.input_size else (args.img_size or '')
    parts = (datetime.now().strftime('%Y%m%d-%H%M%S'), args.model, size)
    return os.path.join(root, '-'.join(str(p) for p in parts if p))


# ---- memory on the CPU ------------------------------------------------------------------------------------
def activation_bytes(model: torch.nn.Module, input_size,
                     amp_dtype: Optional[torch.dtype] = None) -> Tuple[float, float]:
    """(per step, per image) bytes autograd keeps for the backward pass of ``model`` on images of ``input_size``
    (C, H, W), parameters excluded: measured in two forward passes of one small image (2 and 4 times the model's
    total patch size), extrapolated linearly in the number of tokens of the first stage (a Sequencer's
    activations are per token; what does not grow with the input, such as an engine's copies of the weights, is
    kept once per step). The model's training mode and the random generators are left as they were."""
    c, h, w = input_size
    patches = getattr(model, 'patch_sizes', None) or (1,)
    first, unit = patches[0], math.prod(patches)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    device = next(model.parameters()).device

    def tokens(height, width):   # of the first stage
        return max(1, height // first) * max(1, width // first)

    def kept(height, width) -> int:
        found: Dict[int, int] = {}

        def pack(t):
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):   # tensors without storage (wrapper subclasses)
                return t
            if storage.data_ptr() not in params:
                found[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.random.fork_rng(devices=[]), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, amp_dtype):
            model(torch.zeros(1, c, height, width, device=device))
        return sum(found.values())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny inputs: one thread is fastest (no waiting on busy cores)
    try:
        if 4 * unit >= min(h, w):   # a small input: measured as it is, all of it per image
            return 0.0, float(kept(h, w))
        small, large = kept(2 * unit, 2 * unit), kept(4 * unit, 4 * unit)
    finally:
        torch.set_num_threads(threads)
    per_token = max(0.0, (large - small) / (tokens(4 * unit, 4 * unit) - tokens(2 * unit, 2 * unit)))
    per_step = max(0.0, small - per_token * tokens(2 * unit, 2 * unit))
    return per_step, per_token * tokens(h, w)


def available_memory() -> Optional[int]:
    """Bytes this process may still allocate: /proc/meminfo's MemAvailable, lowered to what is left of a
    cgroup's memory limit where one is set (containers); None where neither is known."""
    found = []
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory.current'),
                         ('/sys/fs/cgroup/memory/memory.limit_in_bytes',
                          '/sys/fs/cgroup/memory/memory.usage_in_bytes')):
        try:
            with open(limit) as f, open(usage) as g:
                text = f.read().strip()
                if text != 'max' and int(text) < 2 ** 60:
                    found.append(int(text) - int(g.read().strip()))
                break
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def step_memory(model: torch.nn.Module, args, input_size, amp_dtype: Optional[torch.dtype]) -> Tuple[float, float]:
    """(fixed, per image) bytes a training step adds to what is allocated now: gradients, optimizer states, the EMA
    copy and what autograd keeps once per step; per image the activations kept for backward (``activation_bytes``,
    whose linear extrapolation from small inputs errs on the high side, which covers backward's own buffers) and
    the input batches in flight (the loader's workers prepare two each)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    states = 1 if args.opt.lower() in ('sgd', 'momentum', 'nesterov') else 2
    fixed = params * (1 + states + (1 if args.model_ema else 0))
    per_step, per_image = activation_bytes(model, input_size, amp_dtype)
    inputs = 4 * math.prod(input_size) * (1 + 2 * args.workers)
    return fixed + per_step, per_image + inputs


def check_cpu_memory(batch: int, fixed: float, per_image: float, available: Optional[float], what: str) -> None:
    """A ``UserError`` naming ``-b`` and a batch size that fits where a training step of ``batch`` images needs more
    memory than is ``available`` (``what``: the model and input size, for the message)."""
    if available is None:
        return
    need = fixed + batch * per_image
    if need <= available:
        return
    fits = int((available - fixed) // per_image)
    if fits < 1:
        advice = "not even one image fits: use a smaller --img-size, or a machine with more memory"
    else:
        accum = math.ceil(batch / fits)
        advice = f"-b {fits} fits (--grad-accum-steps {accum} then updates with {fits * accum} images at a time)"
    raise UserError(f"-b {batch}: a training step of {what} on the CPU needs about {_size(need)} of memory, "
                    f"{_size(available)} are available; {advice}")


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"


class Progress:
    """A tqdm bar on a terminal (images/s, ETA), plain lines at the logged steps otherwise. The bar advances every
    step; the loss is shown only where it was read (``report``)."""

    def __init__(self, total: int, epoch: int, log: Log, start: int = 0):
        self.log, self.total, self.epoch, self.start = log, total, epoch, start
        self.bar = None
        if log.main and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc=f"epoch {epoch}", unit='batch', dynamic_ncols=True)
        self.t0, self.images = time.time(), 0

    def advance(self, images: int):
        self.images += images
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, loss: float, lr: float):
        rate = self.images / max(time.time() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {rate:.1f} img/s")
        else:
            eta = (self.total - step - 1) * (time.time() - self.t0) / max(step + 1 - self.start, 1)
            self.log(f"epoch {self.epoch} [{step + 1}/{self.total}] loss {loss:.4f} lr {lr:.3e} "
                     f"{rate:.1f} img/s eta {eta:.0f}s")

    def close(self):
        if self.bar is not None:
            self.bar.close()


class LossMeter:
    """The training loss summed on the device as the steps go (detached: nothing is read on the host per step);
    read on the host, summed over the ranks, where it is logged, saved or reported at the end of the epoch."""

    def __init__(self, device: torch.device, total: float = 0.0, count: int = 0):
        self.sums = torch.tensor([total, 0.0], dtype=torch.float64, device=device)   # the epoch's, since last read
        self.count, self.window_count = count, 0

    def add(self, loss: torch.Tensor):
        self.sums += loss.detach().to(torch.float64)
        self.count += 1
        self.window_count += 1

    def read_window(self, d: Dist) -> float:
        """The mean loss over all ranks since the last read."""
        counts = torch.tensor([float(self.window_count)], dtype=torch.float64)
        total, n = d.read(torch.cat([self.sums[1:], counts.to(self.sums.device)]))
        self.sums[1] = 0.0
        self.window_count = 0
        return total / n if n else float('nan')

    def read_epoch(self, d: Dist, *extra: float) -> List[float]:
        """(loss sum, step count, *extra) of the epoch so far, summed over the ranks."""
        host = torch.tensor([float(self.count), *map(float, extra)], dtype=torch.float64)
        return d.read(torch.cat([self.sums[:1], host.to(self.sums.device)]))


class Health:
    """Where in the epoch the loss (row 0) and the gradients (row 1) were first non-finite, recorded on the device
    (``note``: nothing is read per step) and checked on the host (``check``) before any figure is logged or any
    checkpoint saved: a run that diverged stops with the last good checkpoint intact (``--nonfinite stop``)."""

    def __init__(self, steps: int, device: torch.device):
        self.bad = torch.zeros(2, steps, dtype=torch.bool, device=device)

    def note(self, row: int, step: int, value: torch.Tensor):
        self.bad[row, step] = ~torch.isfinite(value.detach())

    def check(self, d: Dist, epoch: int, folder: str):
        steps = self.bad.shape[1]
        at = torch.arange(steps, device=self.bad.device)
        first = torch.where(self.bad, at, steps).amin(dim=1).to(torch.float64)
        loss_step, grad_step = d.read(first, op=dist.ReduceOp.MIN)
        if min(loss_step, grad_step) < steps:
            what, step = ('loss', loss_step) if loss_step <= grad_step else ('gradients', grad_step)
            raise UserError(f"non-finite {what} at epoch {epoch}, step {int(step)}; the last good checkpoint in "
                            f"{folder} is intact (lower --lr, try --clip-grad, or --nonfinite skip)")


class Stop:
    """SIGTERM and SIGINT set a flag; the run stops where the ranks agree on it (``agree_on_stop``), saving first."""

    def __init__(self, d: Dist):
        self.d, self.signal = d, None
        self.old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def agree_on_stop(self) -> bool:
        """Whether to stop here. With several ranks every rank must stop at the same step, so the answer is
        the one the ranks agreed on (a collective call: a signal seen by any rank counts for all), never the
        live flag, which a signal arriving just after the agreement may already have set on one rank only;
        such a signal is acted on at the next agreement."""
        if self.d.world == 1:
            return self.signal is not None
        agreed = self.d.all_max(1.0 if self.signal else 0.0) > 0
        if agreed and not self.signal:
            self.signal = 'SIGTERM'
        return agreed

    def restore(self):
        for s, h in self.old.items():
            signal.signal(s, h)


class Run:
    """What ``setup`` builds and every epoch uses.

    args, d (Dist), log; model (the module whose weights are saved), net (what the steps call: the model, in DDP
    and / or compiled), ddp (the DDP wrapper or None), ema, amp_dtype; loss_fn, mixup, optimizer, scaler,
    scheduler, updates_per_epoch, num_epochs, num_updates; train_samples, train_sampler, train_loader,
    eval_loader, batch_erasing (``--resplit`` without the prefetcher); classes, num_classes, data_cfg; folder,
    keeper, rows (the summary), writer (TensorBoard); start_epoch, start_batch and partial (where a resumed run
    starts, and the loss sums of that epoch so far); stop (signals) and resume_hint."""

    def __init__(self, args):
        self.args = args
        self.ddp = self.ema = self.mixup = self.scaler = self.writer = self.batch_erasing = self.stop = None
        self.rows: List[Dict] = []
        self.start_epoch, self.start_batch, self.partial, self.num_updates = 0, 0, (0.0, 0), 0

    def close(self):
        if self.stop is not None:
            self.stop.restore()
        if self.writer is not None:
            self.writer.close()
        if self.d.world > 1 and dist.is_initialized():
            dist.barrier()


# ---- the run ----------------------------------------------------------------------------------------------
# distributed_train.sh's check before torchrun: the first argument, then the training flags. Its exit status
# is 0 (start the processes), 2 (a mistake, said in one line) or NOTHING_TO_LAUNCH (--help was shown, or
# --check-args asked for the check alone).
PRELAUNCH, NOTHING_TO_LAUNCH = '--before-launch', 3


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prelaunch = argv[:1] == [PRELAUNCH]
    try:
        args, _ = parse(build_train_parser(), argv[1:] if prelaunch else argv)
    except SystemExit as e:
        if prelaunch and e.code in (0, None):   # --help, shown once
            return NOTHING_TO_LAUNCH
        raise
    if args.check_args or prelaunch:   # the flags, the model and the data folder: nothing built or written
        check_args(args)
        return NOTHING_TO_LAUNCH if prelaunch and args.check_args else 0
    result = train(args)
    return exit_status(result)


def check_args(args) -> None:
    """The checks of the flags that need neither a process group nor the data's contents: one line (a
    UserError) for the first that fails."""
    spec = get_spec(args.model)   # an unknown name: one line with the closest names
    if args.pretrained and not args.pretrained_path and not spec.weights:
        raise UserError(f"--pretrained: {args.model} has no published weights (give --pretrained-path FILE, or "
                        f"train from scratch)")
    if not args.data_dir and not args.dataset.startswith('torch/'):
        raise UserError("no dataset given: pass the data folder (DIR) or --data-dir")
    if args.data_dir and not args.dataset.startswith(('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')) \
            and not os.path.isdir(args.data_dir):
        raise UserError(f"{args.data_dir}: data directory does not exist")
    check_compile_flags(args.torchcompile, args.torchcompile_mode)
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax:
        if args.batch_size % 2:
            raise UserError(f"--mixup / --cutmix need an even --batch-size, got {args.batch_size}")
    channels = args.in_chans or (args.input_size[0] if args.input_size else 3)
    image_mode(channels, f"--in-chans {channels}")
    if 0 < args.aug_repeats < 1:
        raise UserError(f"--aug-repeats {args.aug_repeats}: give 0 (off) or a number of copies of at least 1")
    if args.aug_repeats and args.epoch_repeats:
        raise UserError("--aug-repeats and --epoch-repeats: give one (repeated augmentation picks the images of "
                        "an epoch itself)")
    if args.resplit and not args.reprob:
        raise UserError("--resplit splits random erasing, which is off: give --reprob too")
    if args.log_tensorboard and importlib.util.find_spec('tensorboard') is None:   # before any run folder is made
        raise UserError("--log-tensorboard needs the tensorboard package (pip install tensorboard, or the "
                        "tensorboard extra of this package)")
    if args.device_augment and args.no_prefetcher:
        raise UserError("--device-augment and --no-prefetcher: the prefetcher normalises and erases the batches "
                        "augmented on the device; give one of them")
    if args.start_epoch is not None and args.start_epoch >= args.epochs:
        raise UserError(f"--start-epoch {args.start_epoch}: nothing to train, the run has --epochs {args.epochs} "
                        f"(epochs 0 to {args.epochs - 1})")


def uses_prefetcher(args, device: torch.device) -> bool:
    """timm's prefetcher (batches copied to the GPU on a side stream, normalised and erased there) on CUDA, as
    timm's train.py uses it, unless ``--no-prefetcher``. On the CPU there is nothing to overlap, except with
    ``--device-augment``, whose batches the prefetcher normalises and erases wherever they are."""
    return (device.type == 'cuda' and not args.no_prefetcher) or getattr(args, 'device_augment', False)


def exit_status(result: Dict) -> int:
    """0 for a finished run; 128 + the signal's number (130 SIGINT, 143 SIGTERM) for one stopped by a signal
    (its progress saved), as shells report a process a signal ended, so that scripts and schedulers can tell."""
    sig = result.get('interrupted')
    return 128 + signal.Signals[sig].value if sig else 0


def model_label(args) -> str:
    """The model as the user asked for it: its name, with the ``--model-kwargs`` that change it (a model is only
    the registered configuration of its name without them); a caller's own name first (``args.model_name``)."""
    kwargs = dict(args.model_kwargs or {})
    label = args.model + (f" with {', '.join(f'{k}={v}' for k, v in kwargs.items())}" if kwargs else '')
    own = getattr(args, 'model_name', None)
    return f"{own} ({label})" if own else label


def train(args) -> Dict:
    """Train as ``args`` say: ``setup``, then ``train_one_epoch`` and ``evaluate_and_checkpoint`` for every
    epoch. Returns the last epoch's figures and the run folder; ``interrupted`` names the signal that stopped a
    run (its progress saved)."""
    run = setup(args)
    result = {}
    if run.start_epoch >= run.num_epochs:   # resuming a run that has finished
        run.log(f"nothing to train: the run is at epoch {run.start_epoch} of {run.num_epochs} (raise --epochs to "
                f"train on)")
    try:
        for epoch in range(run.start_epoch, run.num_epochs):
            train_loss = train_one_epoch(run, epoch)
            if train_loss is None:
                return {'interrupted': run.stop.signal, 'folder': run.folder}
            result = evaluate_and_checkpoint(run, epoch, train_loss)
            # (after the last epoch there is nothing left to stop: the run ends as finished)
            if epoch + 1 < run.num_epochs and run.stop.agree_on_stop():
                run.log(f"{run.stop.signal}: stopped after epoch {epoch}; {run.resume_hint}")
                return {**result, 'interrupted': run.stop.signal}
    finally:
        run.close()
    if run.keeper.best:
        best = os.path.join(run.folder, 'model_best.pth.tar')
        where = best if os.path.exists(best) else 'saved by the run this one resumed from'
        run.log(f"best {args.eval_metric}: {run.keeper.best[0][0]:.4f} at epoch {run.keeper.best[0][1]} ({where})")
    return result


# ---- setup ------------------------------------------------------------------------------------------------
def setup(args) -> Run:
    """Everything the epochs need, in this order: process group, data, model, loaders, optimisation, run folder
    and resuming, wrappers (DDP, torch.compile), signal handlers. Every user mistake is found here, before the
    first step and, but for the run folder, before anything is written."""
    run = Run(args)
    d = run.d = Dist(args.device)
    log = run.log = Log(d.main)
    check_args(args)
    if args.pin_mem and d.device.type != 'cuda':
        raise UserError("--pin-mem: pinned memory speeds up copies to a GPU; this run is on the CPU")
    run.amp_dtype = amp_dtype_for(args, d.device, log)
    random.seed(args.seed + d.rank)
    np.random.seed(args.seed + d.rank)
    torch.manual_seed(args.seed + d.rank)
    if d.device.type == 'cpu' and not args.no_malloc_tuning:
        keep_freed_memory()   # the same large activations every step: keep them mapped (sequencer.engine.malloc)

    ds_train, ds_eval = build_datasets(run)
    run.model = build_model(args, run.num_classes, d, log)
    run.data_cfg = data_cfg = resolve_data_config(vars(args), model=run.model)
    fit_channels(data_cfg, data_cfg['input_size'][0])
    check_input_size(run.model, data_cfg['input_size'], '--input-size' if args.input_size else '--img-size')
    if d.device.type == 'cpu':   # before anything large is allocated: the OOM killer says nothing
        fixed, per_image = step_memory(run.model, args, data_cfg['input_size'], run.amp_dtype)
        available = available_memory()
        local = int(os.environ.get('LOCAL_WORLD_SIZE', d.world))
        what = f"{model_label(args)} at {'x'.join(map(str, data_cfg['input_size'][1:]))} px"
        check_cpu_memory(args.batch_size, fixed, per_image, available and available / local, what)
    run.model.to(d.device)
    build_loaders(run, ds_train, ds_eval)
    build_optimisation(run)
    run.folder = run_folder(args, args.resume)
    run.keeper = Keeper(run.folder, args.checkpoint_hist, decreasing=args.eval_metric == 'loss')
    resumed = resume(run)   # read and checked before the run folder is made: a failed resume leaves nothing
    created = d.main and not os.path.exists(run.folder)
    open_run_folder(run)
    try:
        finish_resume(run, resumed)
        wrap_model(run)
    except BaseException:
        log.close()
        if created:   # the folder this run made, holding only what it wrote so far
            import shutil
            shutil.rmtree(run.folder, ignore_errors=True)
        raise

    global_batch = args.batch_size * d.world * args.grad_accum_steps
    log(f"{model_label(args)}: {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters, "
        f"{run.num_classes} classes, input {tuple(data_cfg['input_size'])}, {len(ds_train)} train / "
        f"{len(ds_eval)} eval images")
    log(f"{d.world} process(es) on {d.device.type}; batch {args.batch_size} per process, global batch "
        f"{global_batch}, lr {args.lr:.3e}, {run.num_epochs} epochs, output {run.folder}")
    # how to continue (``args.resume_hint``: a caller's own command, such as the demo's)
    run.resume_hint = getattr(args, 'resume_hint', None) or (
        f"continue with the same command plus --resume auto --experiment {os.path.basename(run.folder)} "
        f"--output {os.path.dirname(run.folder)}")
    run.stop = Stop(d)
    return run


def build_datasets(run: Run):
    """The training and evaluation datasets; ``run.classes`` and ``run.num_classes``. A folder must hold both
    splits (train/ and val/, or the folders --train-split / --val-split name)."""
    args = run.args
    ds_train = build_dataset(args.dataset, args.data_dir, args.train_split, True, args.class_map,
                             args.dataset_download, root_as_split=False)
    ds_eval = build_dataset(args.dataset, args.data_dir, args.val_split, False, args.class_map,
                            args.dataset_download, root_as_split=False)
    classes, eval_classes = class_names_of(ds_train), class_names_of(ds_eval)
    if classes and eval_classes and classes != eval_classes and not args.class_map:
        only_t = sorted(set(classes) - set(eval_classes))[:5]
        only_e = sorted(set(eval_classes) - set(classes))[:5]
        raise UserError(f"{args.data_dir}: train and validation class folders differ (only in train: {only_t}; "
                        f"only in validation: {only_e})")
    found = num_classes_of(ds_train)
    if found is not None and found < 2:
        raise UserError(f"{args.data_dir}: the training split holds {found} class ({', '.join(classes or [])}); "
                        f"a classifier needs at least 2 (one folder per class)")
    num_classes = args.num_classes or found or 1000
    if found and num_classes < found:
        raise UserError(f"--num-classes {num_classes} is smaller than the {found} classes of {args.data_dir}")
    run.classes, run.num_classes = classes, num_classes
    return ds_train, ds_eval


def build_loaders(run: Run, ds_train, ds_eval):
    """timm's transforms over seeded samples (``data.datasets``); timm's prefetcher on CUDA; the sampler of
    ``--aug-repeats`` (timm's RepeatAugSampler) or ``--epoch-repeats``; ``--pin-mem``; ``--resplit``."""
    args, d, cfg = run.args, run.d, run.data_cfg
    if args.aa and args.aa.startswith('rand'):  # timm silently ignores RandAugment sections without a value
        bad = [c for c in args.aa.split('-')[1:] if not c.startswith('t') and not any(ch.isdigit() for ch in c)]
        if bad:
            raise UserError(f"--aa {args.aa}: not a valid augmentation policy (section {bad[0]!r} has no value)")
    posterize_keeps_zero_bits()
    prefetch = uses_prefetcher(args, d.device)
    # random erasing: per image in the transform, or over whole batches (the prefetcher's, or --resplit's)
    per_image_erasing = args.reprob if not prefetch and not args.resplit else 0.
    try:
        train_tf = create_transform(
            cfg['input_size'], is_training=True, no_aug=args.no_aug, scale=args.scale, ratio=args.ratio,
            hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
            interpolation=args.train_interpolation, mean=cfg['mean'], std=cfg['std'],
            re_prob=per_image_erasing, re_mode=args.remode, re_count=args.recount, use_prefetcher=prefetch)
    except (ValueError, AssertionError, KeyError) as e:
        raise UserError(f"--aa {args.aa}: not a valid augmentation policy ({e})" if args.aa else
                        f"invalid augmentation settings ({e})") from None
    eval_tf = create_transform(
        cfg['input_size'], is_training=False, interpolation=cfg['interpolation'], mean=cfg['mean'], std=cfg['std'],
        crop_pct=cfg['crop_pct'], crop_mode=cfg.get('crop_mode'), use_prefetcher=prefetch)
    mode = IMAGE_MODES[cfg['input_size'][0]]
    device_augment = None
    if args.device_augment:   # the loader processes draw timm's parameters; the device decodes and augments
        train_tf = Plan(train_tf, cfg['input_size'][0])
        device_augment = DeviceAugment(train_tf, d.device, skip_bad=args.bad_samples == 'skip')
    run.train_samples = Samples(ds_train, train_tf, seed=args.seed, bad_samples=args.bad_samples, img_mode=mode)
    eval_samples = Samples(ds_eval, eval_tf, seed=args.seed, bad_samples=args.bad_samples, img_mode=mode)
    if args.aug_repeats:
        run.train_sampler = RepeatAugShards(len(ds_train), args.aug_repeats, d.world, d.rank, seed=args.seed,
                                            batch_size=args.batch_size)
    else:
        run.train_sampler = ShardSampler(len(ds_train), d.world, d.rank, shuffle=True, seed=args.seed,
                                         drop_last=True, batch_size=args.batch_size, repeats=args.epoch_repeats)
    if len(run.train_sampler.indices()) == 0:
        raise UserError(f"--batch-size {args.batch_size} x {d.world} process(es) is larger than the "
                        f"{len(ds_train)} training images (the last incomplete batch is dropped)")
    eval_sampler = ShardSampler(len(ds_eval), d.world, d.rank, shuffle=False, drop_last=False)
    run.train_loader = make_loader(run.train_samples, run.train_sampler, args.batch_size, args.workers, args.pin_mem)
    run.eval_loader = make_loader(eval_samples, eval_sampler, args.validation_batch_size or args.batch_size,
                                  args.workers, args.pin_mem)
    erase = dict(re_prob=0. if args.no_aug else args.reprob, re_mode=args.remode, re_count=args.recount,
                 re_num_splits=2 if args.resplit else 0)   # as timm's create_loader
    if prefetch:
        run.train_loader = Prefetched(run.train_loader, cfg['input_size'], cfg['mean'], cfg['std'], d.device,
                                      device_augment=device_augment, **erase)
        run.eval_loader = Prefetched(run.eval_loader, cfg['input_size'], cfg['mean'], cfg['std'], d.device)
    elif args.resplit and erase['re_prob']:
        run.batch_erasing = SplitErasing(args.reprob, args.remode, args.recount, args.seed)
    run.updates_per_epoch = len(run.train_sampler) // args.batch_size // args.grad_accum_steps
    if run.updates_per_epoch == 0:
        raise UserError(f"--grad-accum-steps {args.grad_accum_steps} exceeds the batches in an epoch")


def build_optimisation(run: Run):
    """Loss (label smoothing, or soft targets with mixup / cutmix), optimizer, loss scaler, EMA, scheduler."""
    args, d, model = run.args, run.d, run.model
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax:
        run.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                          prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                          label_smoothing=args.smoothing, num_classes=run.num_classes)
        run.loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        run.loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        run.loss_fn = torch.nn.CrossEntropyLoss()
    args.lr = scaled_lr(args, d.world)
    try:
        run.optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    except (ValueError, AssertionError) as e:
        raise UserError(f"--opt {args.opt}: {first_line(e)}") from None
    if run.amp_dtype == torch.float16 and d.device.type == 'cuda':
        run.scaler = torch.amp.GradScaler('cuda')
    if args.model_ema:
        run.ema = ModelEmaV3(model, decay=args.model_ema_decay, device='cpu' if args.model_ema_force_cpu else None)
        if args.model_ema_force_cpu and d.device.type != 'cpu':
            run.log("--model-ema-force-cpu: the EMA weights are kept (and saved) on the CPU, not evaluated each "
                    "epoch (as timm's train.py)")
    try:
        run.scheduler, run.num_epochs = create_scheduler_v2(run.optimizer, **scheduler_kwargs(args),
                                                            updates_per_epoch=run.updates_per_epoch)
    except (ValueError, AssertionError) as e:
        raise UserError(f"--sched {args.sched}: {first_line(e)}") from None
    if run.scheduler is None:
        raise UserError(f"--sched {args.sched}: unknown scheduler")


def open_run_folder(run: Run):
    """The run folder ``run.folder`` (created, cleared of the temporary files of writes a crash cut short) and
    log.txt."""
    args, d, folder = run.args, run.d, run.folder
    if d.main:
        check_output(folder, '--output' if args.output else 'run folder', folder=True)   # creates it
        for name in os.listdir(folder):
            if (name.startswith('.') and name.endswith('.tmp')) or name.endswith('.tmp-link'):
                try:
                    os.unlink(os.path.join(folder, name))
                except OSError:
                    pass
        run.log.open(os.path.join(folder, 'log.txt'))


def resume(run: Run) -> Optional[str]:
    """Continue from ``--resume`` (a file, or 'auto': the newest valid checkpoint of the run folder): weights,
    optimizer, scaler, EMA, position, summary, best checkpoints and RNG states, read and checked before the run
    folder is made (nothing is written here). Returns the checkpoint resumed from, or None."""
    args, d, log = run.args, run.d, run.log
    path = args.resume
    if path == 'auto':
        path = find_resume(run.folder, log)
        if path is None:
            log(f"--resume auto: no valid checkpoint in {run.folder}, starting from scratch")
    if path:
        ckpt = valid_checkpoint(path) if os.path.isfile(path) else None
        if ckpt is None:
            raise UserError(f"{path}: not a complete training checkpoint (missing, truncated or corrupt)")
        _check_resume_fits(ckpt, path, args, run.classes, d.world)
        load_state_dict(run.model, unwrap(ckpt), source=path)   # the file read once, above
        if not args.no_resume_opt:
            try:
                run.optimizer.load_state_dict(ckpt['optimizer'])
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise UserError(f"{path}: its optimizer state does not fit --opt {args.opt} ({first_line(e)}); "
                                f"resume with the run's optimizer, or pass --no-resume-opt") from None
            if run.scaler is not None and ckpt.get('scaler'):
                run.scaler.load_state_dict(ckpt['scaler'])
        if run.ema is not None and ckpt.get('state_dict_ema'):
            run.ema.module.load_state_dict(ckpt['state_dict_ema'])
        run.start_epoch, run.start_batch = ckpt['next_epoch'], ckpt.get('next_batch', 0)
        run.partial = tuple(ckpt.get('partial', (0.0, 0)))
        run.rows = list(ckpt.get('summary', []))
        run.keeper.best = [list(b) for b in ckpt.get('best', [])]
        set_rng_state(ckpt['rng'])
    return path or None


def finish_resume(run: Run, path: Optional[str]):
    """What resuming writes, once the run folder is open: the best-checkpoint files a crash left out and
    summary.csv, rewritten from the checkpoint (a crash after the checkpoint and before the summary left its row
    out); args.yaml; the schedule moved to the starting position."""
    args, d, log = run.args, run.d, run.log
    if path:
        if d.main and run.start_batch == 0:
            run.keeper.restore_links(path, run.start_epoch - 1)
        if d.main and run.rows:
            write_summary(run.folder, run.rows)
        log(f"resumed from {path} at epoch {run.start_epoch}"
            + (f", batch {run.start_batch}" if run.start_batch else ''))
    if args.start_epoch is not None:
        run.start_epoch = args.start_epoch
    if d.main:
        write_text(os.path.join(run.folder, 'args.yaml'), _yaml(args))
    run.num_updates = run.start_epoch * run.updates_per_epoch + run.start_batch // args.grad_accum_steps
    if run.start_epoch or run.start_batch:
        if args.sched_on_updates:
            run.scheduler.step_update(run.num_updates)
        else:
            run.scheduler.step(run.start_epoch)


def wrap_model(run: Run):
    """DDP across processes, torch.compile, and the TensorBoard writer."""
    args, d = run.args, run.d
    run.net = run.model
    if d.world > 1:
        run.net = run.ddp = DDP(run.model, device_ids=[d.device.index] if d.device.type == 'cuda' else None)
    if args.torchcompile or args.torchcompile_mode:
        run.net = torch_compile(run.net, d.device, args.torchcompile, args.torchcompile_mode)
    if args.log_tensorboard and d.main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--log-tensorboard needs the tensorboard package (pip install tensorboard, or the "
                            "tensorboard extra of this package)") from None
        run.writer = SummaryWriter(os.path.join(run.folder, 'tensorboard'))


def checkpoint_state(run: Run, next_epoch: int, next_batch: int, metric=None, partial=(0.0, 0)) -> Dict:
    """Everything to continue from ``next_epoch``, batch ``next_batch`` (``partial``: that epoch's loss sum and
    step count so far, over all ranks)."""
    args = run.args
    return {'version': CHECKPOINT_VERSION, 'arch': args.model, 'num_classes': run.num_classes,
            'model_kwargs': dict(args.model_kwargs or {}), 'model_label': model_label(args),
            'model_name': getattr(args, 'model_name', None) or args.model,
            'class_names': run.classes, 'epoch': next_epoch - 1 if next_batch == 0 else next_epoch,
            'next_epoch': next_epoch, 'next_batch': next_batch, 'state_dict': run.model.state_dict(),
            'state_dict_ema': run.ema.module.state_dict() if run.ema is not None else None,
            'optimizer': run.optimizer.state_dict(), 'scaler': run.scaler.state_dict() if run.scaler else None,
            'scheduler': run.scheduler.state_dict(), 'args': _plain(vars(args)), 'metric': metric,
            'summary': run.rows, 'partial': list(partial), 'rng': rng_state(), 'world_size': run.d.world}


# ---- one epoch --------------------------------------------------------------------------------------------
def train_one_epoch(run: Run, epoch: int) -> Optional[float]:
    """One epoch of training (from ``run.start_batch`` where a resumed run starts inside it). Returns the mean
    training loss over all ranks (NaN when every step was skipped), or None where a signal stopped the run (its
    progress saved in recovery.pth.tar).

    The loss is read on the host only at the logged steps (every ``--log-interval``), where a checkpoint is saved
    and at the end; with several ranks, a signal is agreed on at the first update after each logged step."""
    args, d = run.args, run.d
    first = epoch == run.start_epoch
    skip = run.start_batch if first else 0
    run.train_samples.set_epoch(epoch)
    run.train_sampler.set_epoch(epoch, skip_batches=skip)
    if run.mixup is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        run.mixup.mixup_enabled = False
    run.net.train()
    steps = skip + len(run.train_sampler) // args.batch_size
    losses = LossMeter(d.device, *(run.partial if first and d.main else (0.0, 0)))
    health = Health(steps, d.device)
    bar = Progress(steps, epoch, run.log, start=skip)
    skipped, agreement_due = 0, False
    run.optimizer.zero_grad()
    for i, (images, targets, n_bad) in enumerate(run.train_loader):
        step = skip + i
        skipped += n_bad
        if _batch_skipped(run, images):
            continue
        update = (step + 1) % args.grad_accum_steps == 0   # the last micro-step of an update
        loss = forward_backward(run, images, targets, health, epoch, step, sync=update)
        if loss is None:
            continue   # a non-finite loss, the step skipped (--nonfinite skip)
        if update and not optimizer_step(run, health, epoch, step):
            continue   # non-finite gradients, the update skipped (--nonfinite skip)
        losses.add(loss)
        bar.advance(images.shape[0] * d.world)

        logged = (step + 1) % args.log_interval == 0 or step + 1 == steps
        boundary = update and step + 1 < steps   # where the run may stop and save
        recovery = boundary and args.recovery_interval and (step + 1) % args.recovery_interval == 0
        if logged:
            health.check(d, epoch, run.folder)
            lr = run.optimizer.param_groups[0]['lr']
            value = losses.read_window(d)
            bar.report(step, value, lr)
            if run.writer is not None:
                run.writer.add_scalar('train/loss', value, run.num_updates)
                run.writer.add_scalar('train/lr', lr, run.num_updates)
        agreement_due = agreement_due or logged
        stopping = False
        if boundary and (d.world == 1 or agreement_due):
            stopping, agreement_due = run.stop.agree_on_stop(), False
        if stopping or recovery:
            health.check(d, epoch, run.folder)
            part = losses.read_epoch(d)
            if d.main:
                run.keeper.save_recovery(checkpoint_state(run, epoch, step + 1, partial=part))
        if stopping:
            bar.close()
            run.log(f"{run.stop.signal}: saved {os.path.join(run.folder, 'recovery.pth.tar')} at epoch {epoch}, "
                    f"step {step + 1}; {run.resume_hint}")
            return None
    bar.close()
    health.check(d, epoch, run.folder)
    loss_sum, loss_count, skipped = losses.read_epoch(d, skipped)
    if skipped:
        run.log(f"epoch {epoch}: skipped {int(skipped)} unreadable sample(s)")
    return loss_sum / loss_count if loss_count else float('nan')


def _batch_skipped(run: Run, images) -> bool:
    """A batch whose every sample was unreadable (only with --bad-samples skip) is skipped; with several ranks,
    by all of them together, since each step's collectives must match across ranks."""
    if run.d.world > 1 and run.args.bad_samples == 'skip':
        return run.d.all_max(1.0 if images is None else 0.0) > 0
    return images is None


def forward_backward(run: Run, images, targets, health: Health, epoch: int, step: int,
                     sync: bool) -> Optional[torch.Tensor]:
    """The loss of one micro-batch, its gradients added to those accumulated. Under DDP the gradients are
    synchronised only where ``sync`` (the last micro-step of an update). None where the loss is not finite and
    ``--nonfinite skip`` drops the step (which reads the loss on the host every step)."""
    args, d = run.args, run.d
    if run.batch_erasing is not None:
        images = run.batch_erasing(images, epoch, step, d.rank)
    images, targets = images.to(d.device, non_blocking=True), targets.to(d.device, non_blocking=True)
    if run.mixup is not None:
        images, targets = run.mixup(images, targets)
    with run.ddp.no_sync() if run.ddp is not None and not sync else contextlib.nullcontext():
        with autocast(d.device, run.amp_dtype):
            loss = run.loss_fn(run.net(images), targets)
        if args.nonfinite == 'skip':
            if d.all_max(0.0 if bool(torch.isfinite(loss)) else 1.0) > 0:
                run.log(f"epoch {epoch} step {step}: non-finite loss, step skipped")
                run.optimizer.zero_grad()
                return None
        else:
            health.note(0, step, loss)
        scaled = loss / args.grad_accum_steps
        (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
    return loss.detach()


def optimizer_step(run: Run, health: Health, epoch: int, step: int) -> bool:
    """One update from the accumulated gradients (clipped, scaled), then EMA and schedule. False where the
    gradients are not finite and ``--nonfinite skip`` drops the update; fp16 loss scaling skips its own."""
    args, opt = run.args, run.optimizer
    if run.scaler is not None:
        run.scaler.unscale_(opt)
    else:
        norm = _grad_norm(run.model)
        if args.nonfinite == 'skip':
            if not bool(torch.isfinite(norm)):
                run.log(f"epoch {epoch} step {step}: non-finite gradients, update skipped")
                opt.zero_grad()
                return False
        else:
            health.note(1, step, norm)
    if args.clip_grad is not None:
        dispatch_clip_grad(run.model.parameters(), args.clip_grad, mode=args.clip_mode)
    if run.scaler is not None:
        run.scaler.step(opt)
        run.scaler.update()
    else:
        opt.step()
    opt.zero_grad()
    run.num_updates += 1
    if run.ema is not None:
        run.ema.update(run.model, step=run.num_updates)
    run.scheduler.step_update(num_updates=run.num_updates)
    return True


# ---- evaluate and checkpoint ------------------------------------------------------------------------------
def evaluate_and_checkpoint(run: Run, epoch: int, train_loss: float) -> Dict:
    """Evaluate the model (and its EMA) after ``epoch``, step the schedule, save the epoch's checkpoint, then
    add its row to summary.csv: the summary never names an epoch whose checkpoint is not on disk."""
    args, d, log = run.args, run.d, run.log
    metrics = evaluate(run.model, run.eval_loader, d.device, run.amp_dtype)
    if metrics['skipped']:
        log(f"epoch {epoch}: skipped {metrics['skipped']} unreadable validation sample(s)"
            + ('; none could be read: the eval figures are NaN' if not metrics['count'] else ''))
    row = {'epoch': epoch, 'train_loss': f"{train_loss:.6f}", 'eval_loss': f"{metrics['loss']:.6f}",
           'eval_top1': f"{metrics['top1']:.4f}", 'eval_top5': f"{metrics['top5']:.4f}",
           'lr': f"{run.optimizer.param_groups[0]['lr']:.6e}"}
    if run.ema is not None and next(run.ema.module.parameters()).device.type == d.device.type:
        row['eval_ema_top1'] = f"{evaluate(run.ema.module, run.eval_loader, d.device, run.amp_dtype)['top1']:.4f}"
    run.rows.append(row)
    metric = metrics[args.eval_metric]
    run.scheduler.step(epoch + 1, metric)
    log(f"epoch {epoch}: train loss {train_loss:.4f}, eval loss {metrics['loss']:.4f}, "
        f"top-1 {metrics['top1']:.2f}, top-5 {metrics['top5']:.2f}")
    if epoch == run.start_epoch:   # training and evaluation have both run: what 'auto' chose for each
        engine = autotune.describe(run.model)
        if d.device.type == 'cpu' and engine != 'native':   # the fast engine's CPU GEMMs: MKL or oneDNN
            engine += f"; CPU GEMMs: {gemm.describe()}"
        log(f"rnn engine: {engine}")
    if run.writer is not None:
        for k in ('loss', 'top1', 'top5'):
            run.writer.add_scalar(f'eval/{k}', metrics[k], epoch)
    if d.main:
        run.keeper.save_epoch(checkpoint_state(run, epoch + 1, 0, metric=metric), epoch, metric)
        write_summary(run.folder, run.rows)
        plot_curves(run.folder, run.rows)
    return {'folder': run.folder, 'epoch': epoch, **metrics, 'best': run.keeper.best}


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=next(model.parameters()).device)


def _plain(obj):
    """Only types that weights_only unpickling accepts (no argparse / numpy objects)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _yaml(args) -> str:
    import yaml
    return yaml.safe_dump(_plain(vars(args)), default_flow_style=False)
