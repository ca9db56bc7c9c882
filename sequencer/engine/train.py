"""Training: one loop, readable top to bottom, standing on timm's factories.

Run with ``sequencer train ...``, ``python train.py ...`` or ``./distributed_train.sh NUM_PROC ...``
(torchrun, DDP). The flags are timm's train.py flags with the same meanings.

A run folder (``--output``/``--experiment``) receives args.yaml, summary.csv, log.txt, train_curve.png,
last.pth.tar, the best ``--checkpoint-hist`` checkpoints (checkpoint-<epoch>.pth.tar) and
model_best.pth.tar. Every file is written atomically. A checkpoint holds everything needed to continue
exactly where it was written: model, optimizer, loss scaler, scheduler, EMA, position in the epoch,
RNG states and the summary so far, so that a resumed run ends with the same weights and summary rows as
one never interrupted (on CPU with a fixed seed).
"""
import csv
import io
import math
import os
import random
import signal
import sys
import time
from datetime import datetime
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch.nn.parallel import DistributedDataParallel as DDP

from ..data.datasets import (Samples, ShardSampler, build_dataset, class_difference, class_names_of, make_loader,
                              num_classes_of)
from ..data.loaders import check_input_size, posterize_keeps_zero_bits
from ..errors import UserError, first_line
from ..models import get_spec, load_checkpoint
from ..models.weights import CheckpointError, load_state_dict, read_file, unwrap
from .args import build_train_parser, parse
from .evaluate import autocast, check_compile_flags, evaluate, torch_compile
from .io import check_output, save_torch, write_text
from .loading import create_model_checked
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
        want_cuda = (device_arg or ('cuda' if torch.cuda.is_available() else 'cpu')).startswith('cuda')
        if want_cuda and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
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


class Log:
    """Lines to stdout and log.txt (main process only)."""

    def __init__(self, main: bool):
        self.main, self.file = main, None

    def open(self, path: str):
        if self.main:
            self.file = open(path, 'a', buffering=1)

    def __call__(self, msg: str):
        if not self.main:
            return
        print(msg, flush=True)
        if self.file:
            self.file.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {msg}\n")


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
    if args.in_chans:
        kwargs['in_chans'] = args.in_chans
    size = args.input_size[-1] if args.input_size else args.img_size
    if size:
        kwargs['img_size'] = size
    model = create_model_checked(args.model, kwargs, f' or --drop {args.drop}',
                                 pretrained=args.pretrained and not args.pretrained_path, num_classes=num_classes,
                                 drop_rate=args.drop, rnn_engine=args.rnn_engine)
    if args.pretrained_path:
        load_checkpoint(model, args.pretrained_path, reset_head=True)
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
    return os.path.join(root, '-'.join(str(p) for p in (datetime.now().strftime('%Y%m%d-%H%M%S'), args.model, size) if p))


class Progress:
    """A tqdm bar on a terminal (images/s, ETA), plain lines every ``interval`` batches otherwise."""

    def __init__(self, total: int, epoch: int, log: Log, interval: int, enabled: bool, start: int = 0):
        self.log, self.interval, self.total, self.epoch = log, interval, total, epoch
        self.bar = None
        if enabled and log.main and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc=f"epoch {epoch}", unit='batch', dynamic_ncols=True)
        self.t0, self.images = time.time(), 0

    def update(self, step: int, images: int, loss: float, lr: float):
        self.images += images
        rate = self.images / max(time.time() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {rate:.1f} img/s", refresh=False)
            self.bar.update(1)
        elif self.log.main and (step + 1) % self.interval == 0 or step + 1 == self.total:
            eta = (self.total - step - 1) * (time.time() - self.t0) / max(step + 1, 1)
            self.log(f"epoch {self.epoch} [{step + 1}/{self.total}] loss {loss:.4f} lr {lr:.3e} "
                     f"{rate:.1f} img/s eta {eta:.0f}s")

    def close(self):
        if self.bar is not None:
            self.bar.close()


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
    get_spec(args.model)   # an unknown name: one line with the closest names
    if not args.data_dir and not args.dataset.startswith('torch/'):
        raise UserError("no dataset given: pass the data folder (DIR) or --data-dir")
    if args.data_dir and not args.dataset.startswith(('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')) \
            and not os.path.isdir(args.data_dir):
        raise UserError(f"{args.data_dir}: data directory does not exist")
    check_compile_flags(args.torchcompile, args.torchcompile_mode)
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax:
        if args.batch_size % 2:
            raise UserError(f"--mixup / --cutmix need an even --batch-size, got {args.batch_size}")


def exit_status(result: Dict) -> int:
    """0 for a finished run; 128 + the signal's number (130 SIGINT, 143 SIGTERM) for one stopped by a signal
    (its progress saved), as shells report a process a signal ended, so that scripts and schedulers can tell."""
    sig = result.get('interrupted')
    return 128 + signal.Signals[sig].value if sig else 0


def train(args) -> Dict:
    d = Dist(args.device)
    log = Log(d.main)
    check_args(args)
    amp_dtype = amp_dtype_for(args, d.device, log)
    random.seed(args.seed + d.rank)
    np.random.seed(args.seed + d.rank)
    torch.manual_seed(args.seed + d.rank)
    if d.device.type == 'cpu' and not args.no_malloc_tuning:
        keep_freed_memory()   # the same large activations every step: keep them mapped (sequencer.engine.malloc)

    # data
    ds_train = build_dataset(args.dataset, args.data_dir, args.train_split, True, args.class_map, args.dataset_download)
    ds_eval = build_dataset(args.dataset, args.data_dir, args.val_split, False, args.class_map, args.dataset_download)
    classes = class_names_of(ds_train)
    eval_classes = class_names_of(ds_eval)
    if classes and eval_classes and classes != eval_classes and not args.class_map:
        only_t = sorted(set(classes) - set(eval_classes))[:5]
        only_e = sorted(set(eval_classes) - set(classes))[:5]
        raise UserError(f"{args.data_dir}: train and validation class folders differ (only in train: {only_t}; "
                        f"only in validation: {only_e})")
    num_classes = args.num_classes or num_classes_of(ds_train) or 1000
    if num_classes_of(ds_train) and num_classes < num_classes_of(ds_train):
        raise UserError(f"--num-classes {num_classes} is smaller than the {num_classes_of(ds_train)} classes of "
                        f"{args.data_dir}")

    # model
    model = build_model(args, num_classes, d, log)
    data_cfg = resolve_data_config(vars(args), model=model)
    check_input_size(model, data_cfg['input_size'], '--input-size' if args.input_size else '--img-size')
    model.to(d.device)
    if args.aa and args.aa.startswith('rand'):  # timm silently ignores RandAugment sections without a value
        bad = [c for c in args.aa.split('-')[1:] if not c.startswith('t') and not any(ch.isdigit() for ch in c)]
        if bad:
            raise UserError(f"--aa {args.aa}: not a valid augmentation policy (section {bad[0]!r} has no value)")
    posterize_keeps_zero_bits()
    try:
        train_tf = create_transform(
            data_cfg['input_size'], is_training=True, no_aug=args.no_aug, scale=args.scale, ratio=args.ratio,
            hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
            interpolation=args.train_interpolation, mean=data_cfg['mean'], std=data_cfg['std'],
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    except (ValueError, AssertionError, KeyError) as e:
        raise UserError(f"--aa {args.aa}: not a valid augmentation policy ({e})" if args.aa else
                        f"invalid augmentation settings ({e})") from None
    eval_tf = create_transform(
        data_cfg['input_size'], is_training=False, interpolation=data_cfg['interpolation'],
        mean=data_cfg['mean'], std=data_cfg['std'], crop_pct=data_cfg['crop_pct'],
        crop_mode=data_cfg.get('crop_mode'))
    train_samples = Samples(ds_train, train_tf, seed=args.seed, bad_samples=args.bad_samples)
    eval_samples = Samples(ds_eval, eval_tf, seed=args.seed, bad_samples=args.bad_samples)
    train_sampler = ShardSampler(len(ds_train), d.world, d.rank, shuffle=True, seed=args.seed, drop_last=True,
                                 batch_size=args.batch_size)
    if len(train_sampler.indices()) == 0:
        raise UserError(f"--batch-size {args.batch_size} x {d.world} process(es) is larger than the "
                        f"{len(ds_train)} training images (the last incomplete batch is dropped)")
    eval_sampler = ShardSampler(len(ds_eval), d.world, d.rank, shuffle=False, drop_last=False)
    pin = d.device.type == 'cuda'
    train_loader = make_loader(train_samples, train_sampler, args.batch_size, args.workers, pin)
    eval_loader = make_loader(eval_samples, eval_sampler, args.validation_batch_size or args.batch_size,
                              args.workers, pin)
    updates_per_epoch = len(train_sampler) // args.batch_size // args.grad_accum_steps
    if updates_per_epoch == 0:
        raise UserError(f"--grad-accum-steps {args.grad_accum_steps} exceeds the batches in an epoch")

    # optimisation
    mixup = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=num_classes)
        loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        loss_fn = torch.nn.CrossEntropyLoss()
    args.lr = scaled_lr(args, d.world)
    try:
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    except (ValueError, AssertionError) as e:
        raise UserError(f"--opt {args.opt}: {first_line(e)}") from None
    scaler = torch.amp.GradScaler('cuda') if amp_dtype == torch.float16 and d.device.type == 'cuda' else None
    ema = ModelEmaV3(model, decay=args.model_ema_decay,
                     device='cpu' if args.model_ema_force_cpu else None) if args.model_ema else None
    try:
        scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                    updates_per_epoch=updates_per_epoch)
    except (ValueError, AssertionError) as e:
        raise UserError(f"--sched {args.sched}: {first_line(e)}") from None
    if scheduler is None:
        raise UserError(f"--sched {args.sched}: unknown scheduler")

    # output folder and resuming
    folder = run_folder(args, args.resume)
    if d.main:
        check_output(folder, '--output' if args.output else 'run folder', folder=True)   # creates it
        for name in os.listdir(folder):  # temporary files of writes that a crash cut short
            if (name.startswith('.') and name.endswith('.tmp')) or name.endswith('.tmp-link'):
                try:
                    os.unlink(os.path.join(folder, name))
                except OSError:
                    pass
        log.open(os.path.join(folder, 'log.txt'))
    resume_path = args.resume
    if resume_path == 'auto':
        resume_path = find_resume(folder, log)
        if resume_path is None:
            log(f"--resume auto: no valid checkpoint in {folder}, starting from scratch")
    keeper = Keeper(folder, args.checkpoint_hist, decreasing=args.eval_metric == 'loss')
    rows: List[Dict] = []
    start_epoch, start_batch, partial = 0, 0, (0.0, 0)
    if resume_path:
        ckpt = valid_checkpoint(resume_path) if os.path.isfile(resume_path) else None
        if ckpt is None:
            raise UserError(f"{resume_path}: not a complete training checkpoint (missing, truncated or corrupt)")
        _check_resume_fits(ckpt, resume_path, args, classes, d.world)
        load_state_dict(model, unwrap(ckpt), source=resume_path)   # the file read once, above
        if not args.no_resume_opt:
            try:
                optimizer.load_state_dict(ckpt['optimizer'])
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise UserError(f"{resume_path}: its optimizer state does not fit --opt {args.opt} ({first_line(e)}); "
                                f"resume with the run's optimizer, or pass --no-resume-opt") from None
            if scaler is not None and ckpt.get('scaler'):
                scaler.load_state_dict(ckpt['scaler'])
        if ema is not None and ckpt.get('state_dict_ema'):
            ema.module.load_state_dict(ckpt['state_dict_ema'])
        start_epoch, start_batch = ckpt['next_epoch'], ckpt.get('next_batch', 0)
        partial = tuple(ckpt.get('partial', (0.0, 0)))
        rows = list(ckpt.get('summary', []))
        keeper.best = [list(b) for b in ckpt.get('best', [])]
        if d.main and start_batch == 0:
            keeper.restore_links(resume_path, start_epoch - 1)
        set_rng_state(ckpt['rng'])
        log(f"resumed from {resume_path} at epoch {start_epoch}" + (f", batch {start_batch}" if start_batch else ''))
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    if d.main:
        write_text(os.path.join(folder, 'args.yaml'), _yaml(args))
    if scheduler is not None and (start_epoch or start_batch):
        if args.sched_on_updates:
            scheduler.step_update(start_epoch * updates_per_epoch + start_batch // args.grad_accum_steps)
        else:
            scheduler.step(start_epoch)

    net = model
    if d.world > 1:
        net = DDP(model, device_ids=[d.device.index] if d.device.type == 'cuda' else None)
    if args.torchcompile or args.torchcompile_mode:
        net = torch_compile(net, d.device, args.torchcompile, args.torchcompile_mode)
    writer = None
    if args.log_tensorboard and d.main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--log-tensorboard needs the tensorboard package (pip install tensorboard, or the "
                            "tensorboard extra of this package)") from None
        writer = SummaryWriter(os.path.join(folder, 'tensorboard'))

    global_batch = args.batch_size * d.world * args.grad_accum_steps
    log(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {num_classes} classes, "
        f"input {tuple(data_cfg['input_size'])}, {len(ds_train)} train / {len(ds_eval)} eval images")
    log(f"{d.world} process(es) on {d.device.type}; batch {args.batch_size} per process, global batch "
        f"{global_batch}, lr {args.lr:.3e}, {num_epochs} epochs, output {folder}")

    stop = {'signal': None}
    # how to continue (``args.resume_hint``: a caller's own command, such as the demo's)
    resume_hint = getattr(args, 'resume_hint', None) or (
        f"continue with the same command plus --resume auto --experiment {os.path.basename(folder)} "
        f"--output {os.path.dirname(folder)}")

    def on_signal(signum, frame):
        stop['signal'] = signal.Signals(signum).name
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def agree_on_stop() -> bool:
        """Whether to stop here. With several ranks every rank must stop at the same step, so the answer is
        the one the ranks agreed on (a collective call: a signal seen by any rank counts for all), never the
        live flag, which a signal arriving just after the agreement may already have set on one rank only;
        such a signal is acted on at the next agreement."""
        if d.world == 1:
            return stop['signal'] is not None
        agreed = d.all_max(1.0 if stop['signal'] else 0.0) > 0
        if agreed and not stop['signal']:
            stop['signal'] = 'SIGTERM'
        return agreed

    def state(next_epoch: int, next_batch: int, metric=None, part=(0.0, 0)) -> Dict:
        return {'version': CHECKPOINT_VERSION, 'arch': args.model, 'num_classes': num_classes,
                'model_kwargs': dict(args.model_kwargs or {}), 'class_names': classes,
                'epoch': next_epoch - 1 if next_batch == 0 else next_epoch, 'next_epoch': next_epoch,
                'next_batch': next_batch, 'state_dict': model.state_dict(),
                'state_dict_ema': ema.module.state_dict() if ema is not None else None,
                'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict() if scaler else None,
                'scheduler': scheduler.state_dict(), 'args': _plain(vars(args)), 'metric': metric,
                'summary': rows, 'partial': list(part), 'rng': rng_state(), 'world_size': d.world}

    result = {}
    num_updates = start_epoch * updates_per_epoch + start_batch // args.grad_accum_steps
    try:
        for epoch in range(start_epoch, num_epochs):
            skip = start_batch if epoch == start_epoch else 0
            train_samples.set_epoch(epoch)
            train_sampler.set_epoch(epoch, skip_batches=skip)
            if mixup is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
                mixup.mixup_enabled = False
            net.train()
            loss_sum, loss_count = partial if epoch == start_epoch else (0.0, 0)
            skipped = 0
            steps = len(train_sampler) // args.batch_size
            bar = Progress(steps + skip, epoch, log, args.log_interval, enabled=True, start=skip)
            optimizer.zero_grad()
            for i, (images, targets, n_bad) in enumerate(train_loader):
                step = skip + i
                skipped += n_bad
                # a batch whose every sample was unreadable (only with --bad-samples skip) is skipped; with
                # several ranks, by all of them together, since each step's collectives must match across ranks
                if d.world > 1 and args.bad_samples == 'skip':
                    if d.all_max(1.0 if images is None else 0.0) > 0:
                        continue
                elif images is None:
                    continue
                images, targets = images.to(d.device, non_blocking=True), targets.to(d.device, non_blocking=True)
                if mixup is not None:
                    images, targets = mixup(images, targets)
                with autocast(d.device, amp_dtype):
                    loss = loss_fn(net(images), targets)
                value = loss.item()
                if not math.isfinite(d.all_max(0.0 if math.isfinite(value) else float('inf'))):
                    if args.nonfinite == 'skip':
                        log(f"epoch {epoch} step {step}: non-finite loss, step skipped")
                        optimizer.zero_grad()
                        continue
                    raise UserError(f"non-finite loss at epoch {epoch}, step {step}; the last good checkpoint "
                                    f"in {folder} is intact (lower --lr, try --clip-grad, or --nonfinite skip)")
                (scaler.scale(loss / args.grad_accum_steps) if scaler else loss / args.grad_accum_steps).backward()
                if (step + 1) % args.grad_accum_steps == 0:
                    if scaler:
                        scaler.unscale_(optimizer)
                    if scaler is None and not _finite_grads(model):  # fp16 scaling handles its own overflows
                        if args.nonfinite == 'skip':
                            log(f"epoch {epoch} step {step}: non-finite gradients, update skipped")
                            optimizer.zero_grad()
                            continue
                        raise UserError(f"non-finite gradients at epoch {epoch}, step {step}; the last good "
                                        f"checkpoint in {folder} is intact (lower --lr, try --clip-grad, or "
                                        f"--nonfinite skip)")
                    if args.clip_grad is not None:
                        dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad()
                    num_updates += 1
                    if ema is not None:
                        ema.update(model, step=num_updates)
                    scheduler.step_update(num_updates=num_updates)
                loss_sum, loss_count = loss_sum + value, loss_count + 1
                lr = optimizer.param_groups[0]['lr']
                bar.update(step, images.shape[0] * d.world, value, lr)
                if writer is not None and (step + 1) % args.log_interval == 0:
                    writer.add_scalar('train/loss', value, num_updates)
                    writer.add_scalar('train/lr', lr, num_updates)
                at_boundary = (step + 1) % args.grad_accum_steps == 0 and step + 1 < steps + skip
                stopping = at_boundary and agree_on_stop()
                if d.main and args.recovery_interval and at_boundary and (step + 1) % args.recovery_interval == 0 \
                        and not stopping:
                    keeper.save_recovery(state(epoch, step + 1, part=(loss_sum, loss_count)))
                if stopping:
                    if d.main:
                        keeper.save_recovery(state(epoch, step + 1, part=(loss_sum, loss_count)))
                    bar.close()
                    log(f"{stop['signal']}: saved {os.path.join(folder, 'recovery.pth.tar')} at epoch {epoch}, "
                        f"step {step + 1}; {resume_hint}")
                    return {'interrupted': stop['signal'], 'folder': folder}
            bar.close()
            loss_sum, loss_count, skipped = d.all_sum(loss_sum, loss_count, skipped)
            if skipped:
                log(f"epoch {epoch}: skipped {int(skipped)} unreadable sample(s)")
            train_loss = loss_sum / loss_count if loss_count else float('nan')  # nan: every step was skipped
            metrics = evaluate(model, eval_loader, d.device, amp_dtype)
            if metrics['skipped']:
                log(f"epoch {epoch}: skipped {metrics['skipped']} unreadable validation sample(s)"
                    + ('; none could be read: the eval figures are NaN' if not metrics['count'] else ''))
            row = {'epoch': epoch, 'train_loss': f"{train_loss:.6f}", 'eval_loss': f"{metrics['loss']:.6f}",
                   'eval_top1': f"{metrics['top1']:.4f}", 'eval_top5': f"{metrics['top5']:.4f}",
                   'lr': f"{optimizer.param_groups[0]['lr']:.6e}"}
            if ema is not None:
                ema_metrics = evaluate(ema.module, eval_loader, d.device, amp_dtype)
                row['eval_ema_top1'] = f"{ema_metrics['top1']:.4f}"
            rows.append(row)
            metric = metrics[args.eval_metric]
            scheduler.step(epoch + 1, metric)
            log(f"epoch {epoch}: train loss {train_loss:.4f}, eval loss {metrics['loss']:.4f}, "
                f"top-1 {metrics['top1']:.2f}, top-5 {metrics['top5']:.2f}")
            if writer is not None:
                for k in ('loss', 'top1', 'top5'):
                    writer.add_scalar(f'eval/{k}', metrics[k], epoch)
            if d.main:
                write_summary(folder, rows)
                plot_curves(folder, rows)
                keeper.save_epoch(state(epoch + 1, 0, metric=metric), epoch, metric)
            result = {'folder': folder, 'epoch': epoch, **metrics, 'best': keeper.best}
            # (after the last epoch there is nothing left to stop: the run ends as finished)
            if epoch + 1 < num_epochs and agree_on_stop():
                log(f"{stop['signal']}: stopped after epoch {epoch}; {resume_hint}")
                return {**result, 'interrupted': stop['signal']}
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if writer is not None:
            writer.close()
        if d.world > 1 and dist.is_initialized():
            dist.barrier()
    if keeper.best:
        best = os.path.join(folder, 'model_best.pth.tar')
        where = best if os.path.exists(best) else 'saved by the run this one resumed from'
        log(f"best {args.eval_metric}: {keeper.best[0][0]:.4f} at epoch {keeper.best[0][1]} ({where})")
    return result


def _finite_grads(model: torch.nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


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
