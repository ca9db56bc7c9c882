"""The input pipeline of ``sequencer benchmark --data DIR``: the training command's loader over an image folder,
timed alone and feeding a step, and the verdict on which of the two sets the pace.

The loader is the one ``sequencer train`` builds (``engine.train.build_loaders``: timm's transforms over the
seeded samples of ``data.datasets``, timm's prefetcher on CUDA), with the augmentations of the seed's
Sequencer2D-S recipe (``RECIPE``, the values of configs/sequencer2d_s_in1k.yaml) for training, or the model's
evaluation transform for inference. Its sampler makes one long epoch (``--epoch-repeats``), so that no timed
batch waits for loader processes to start.

Loader processes deliver their batches in rounds (each makes one whole batch, all of them at about the same
pace), so the loader's counts of warm-up and measured batches are rounded up to whole rounds: the first round
(their start-up) is never timed, and a measurement ends where a round ends.
"""
import argparse
import math
import os
import time
import types
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
from timm.data import Mixup, resolve_data_config

from ..data.datasets import (
    IMAGE_EXTENSIONS,
    Prefetched,
    Samples,
    ShardSampler,
    _split_dir,
    build_dataset,
    class_names_of,
    make_loader,
    seeded,
)
from ..data.loaders import fit_channels
from ..engine.args import build_train_parser, parse
from ..engine.train import build_loaders, check_args
from ..errors import UserError

# The seed's Sequencer2D-S recipe (configs/sequencer2d_s_in1k.yaml): its augmentations as `sequencer train` flags.
# Everything else (random-resized crop scale and ratio, flip, interpolation, mixup switch probability, ...) is
# the training command's default.
RECIPE = {'aa': 'rand-m9-mstd0.5-inc1', 'reprob': 0.25, 'remode': 'pixel', 'mixup': 0.8, 'cutmix': 1.0,
          'smoothing': 0.1}
TARGET = 0.9   # the fraction of the synthetic step that the estimate of loader processes aims at


def default_workers() -> int:
    """The training command's default number of loader processes (``-j``)."""
    return build_train_parser().get_default('workers')


def rounds(batches: int, processes: int) -> int:
    """``batches`` rounded up to whole rounds of ``processes`` loader processes (1 for in-process loading)."""
    p = max(processes, 1)
    return -(-batches // p) * p


# ---- the folder -------------------------------------------------------------------------------------------

def find_split(root: str, mode: str) -> Tuple[str, str]:
    """The split to read and its folder: train/ for training, val/ (else train/) for inference, or ``root``
    itself where it holds class folders only. Missing or image-less folders are one line naming them."""
    if not os.path.exists(root):
        raise UserError(f"--data {root}: no such folder")
    if not os.path.isdir(root):
        raise UserError(f"--data {root}: not a folder (give an image folder: DIR/train/<class>/*.jpg or "
                        f"DIR/<class>/*.jpg)")
    if not any(f.lower().endswith(IMAGE_EXTENSIONS) for _, _, files in os.walk(root) for f in files):
        raise UserError(f"--data {root}: no {'/'.join(IMAGE_EXTENSIONS)} images in it (expected DIR/train/<class>/"
                        f"*.jpg or DIR/<class>/*.jpg)")
    for split in (('validation', 'train') if mode == 'infer' else ('train',)):
        folder = _split_dir(root, split)
        if folder is not None:
            return split, folder
    raise UserError(f"--data {root}: no train/ folder to read (it has split folders, but not train/)")


def train_arguments(root: str, split: str, batch_size: int, workers: int, input_size: Sequence[int], seed: int,
                    repeats: int, device: torch.device, device_augment: bool = False) -> argparse.Namespace:
    """The arguments ``sequencer train`` would run with: the recipe's augmentations, this benchmark's batch,
    loader processes and input size, every other value the training command's default."""
    argv = [root, '--train-split', split, '-b', str(batch_size), '-j', str(workers), '--input-size',
            *map(str, input_size), '--seed', str(seed), '--epoch-repeats', str(repeats), '--device', device.type]
    for key, value in RECIPE.items():
        argv += ['--' + key.replace('_', '-'), str(value)]
    if device_augment:
        argv.append('--device-augment')
    args, _ = parse(build_train_parser(), argv)
    check_args(args)   # e.g. mixup and cutmix pair the images of a batch: an odd batch is refused here
    return args


class DataLoaders:
    """The loader of the training command for ``mode`` over ``dataset``: ``host`` (the DataLoader, whose batches
    stay on the host), ``feed`` (what a step reads: ``host``, or timm's prefetcher over it on CUDA), ``mixup``
    (timm's Mixup of the recipe, applied on the step's device, training only) and ``description``."""

    def __init__(self, mode: str, dataset, args: argparse.Namespace, model: torch.nn.Module, device: torch.device,
                 num_classes: int):
        cfg = resolve_data_config(vars(args), model=model)
        fit_channels(cfg, cfg['input_size'][0])
        run = types.SimpleNamespace(args=args, data_cfg=cfg, d=types.SimpleNamespace(device=device, world=1, rank=0))
        build_loaders(run, dataset, dataset)   # exactly what `sequencer train` builds, for both splits
        prefetch = isinstance(run.train_loader, Prefetched)
        self.mixup = None
        if mode == 'train':
            self.feed = run.train_loader
            self.host = run.train_loader.loader if prefetch else run.train_loader
            # as the training command builds it (engine.train.build_optimisation)
            self.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                               prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                               label_smoothing=args.smoothing, num_classes=num_classes)
            where = f'on the {device.type.upper()} by the prefetcher' if prefetch else 'per image, in the loader'
            self.description = (f"training transform of the Sequencer2D-S recipe: random-resized crop, flip, "
                                f"RandAugment {args.aa}, random erasing {args.reprob} ({where}), then mixup "
                                f"{args.mixup} / cutmix {args.cutmix} in the step")
            if args.device_augment:
                self.description += (f"; --device-augment: loader processes read files and draw the parameters, "
                                     f"the {device.type.upper()} decodes, crops, flips and runs RandAugment")
        else:
            # the evaluation samples of the training command, read over the same long epoch as training's
            eval_loader = run.eval_loader.loader if prefetch else run.eval_loader
            samples: Samples = eval_loader.dataset
            sampler = ShardSampler(len(dataset), shuffle=False, drop_last=True, batch_size=args.batch_size,
                                   seed=args.seed, repeats=args.epoch_repeats)
            self.host = make_loader(samples, sampler, args.batch_size, args.workers, args.pin_mem)
            self.feed = (Prefetched(self.host, cfg['input_size'], cfg['mean'], cfg['std'], device) if prefetch
                         else self.host)
            self.description = (f"evaluation transform: resize, centre crop {cfg['crop_pct']} "
                                f"({cfg['interpolation']})")
        if prefetch and device.type == 'cuda':
            self.description += "; timm's prefetcher copies each batch to the GPU and normalises it there"
        self.prefetch = prefetch
        self.config = cfg


def open_dataset(root: str, mode: str):
    """(dataset, split folder, class count) of ``--data`` for ``mode``."""
    split, folder = find_split(root, mode)
    dataset = build_dataset('', root, split, training=mode == 'train', root_as_split=True)
    return dataset, folder, len(class_names_of(dataset) or []) or 1


def repeats_for(batches: int, batch_size: int, n_images: int) -> int:
    """Passes over the images that one epoch needs for ``batches`` batches (and a pass more: loader processes
    ask for batches ahead of those read)."""
    return math.ceil(batches * batch_size / n_images) + 1


# ---- timing -----------------------------------------------------------------------------------------------

def time_batches(batches: Iterable, warmup: int, iters: int, on_batch: Callable[[torch.Tensor, torch.Tensor], object],
                 sync: Callable[[], None], say: Callable[[str], None], label: str) -> float:
    """Seconds that ``iters`` batches of ``batches`` take after ``warmup`` batches, each handed to ``on_batch``
    (nothing, for the loader alone; a step, end to end). The device is synchronised where the clock starts
    and stops only: batches are copied and steps queued as in training."""
    it = iter(batches)

    def take(i: int):
        try:
            images, targets, _ = next(it)
        except StopIteration:   # the epoch is sized for the run (repeats_for): not expected
            raise RuntimeError(f"{label}: the loader ended after {i} batches") from None
        return images, targets

    try:
        t0 = time.perf_counter()
        for i in range(warmup):
            on_batch(*take(i))
            say(f"{label}: warm-up batch {i + 1}/{warmup} ({time.perf_counter() - t0:.0f} s)")
        sync()
        start = time.perf_counter()
        for i in range(iters):
            on_batch(*take(warmup + i))
            say(f"{label}: batch {i + 1}/{iters} ({time.perf_counter() - start:.0f} s)")
        sync()
        return time.perf_counter() - start
    finally:
        close = getattr(it, 'close', None) or getattr(it, '_shutdown_workers', None)
        if close is not None:
            close()   # the loader's processes stop here, not when the iterator is collected


STAGE_IMAGES = 64   # images over which the loader's stages are timed


def stage_times(samples, images: int = STAGE_IMAGES) -> Dict[str, float]:
    """Where a loader process spends its time per image, in milliseconds: reading and decoding the file
    (``decode``), then each step of the transform in order (named by its class), timed in this process over the
    first ``images`` samples with their seeded augmentations. Collation and the hand-over between processes are
    not included (the per-process loader rate includes them)."""
    transform = samples.transform
    steps = list(getattr(transform, 'transforms', [transform] if transform is not None else []))
    names = ['read' if getattr(transform, 'reads_files', False) else 'decode']   # --device-augment: read only
    for t in steps:
        name = type(t).__name__
        names.append(name if name not in names else f"{name} ({len(names)})")
    totals = dict.fromkeys(names, 0.0)
    n = min(images, len(samples))
    for i in range(n):
        start = time.perf_counter()
        x = samples.image(i)
        totals[names[0]] += time.perf_counter() - start
        with seeded(i):
            for name, t in zip(names[1:], steps):
                start = time.perf_counter()
                x = t(x)
                totals[name] += time.perf_counter() - start
    return {k: v / max(n, 1) * 1e3 for k, v in totals.items()}


def describe_stages(stages: Dict[str, float]) -> str:
    total = sum(stages.values()) or 1.0
    return ("a loader process's time per image (this process, first images): "
            + ', '.join(f"{k} {v:.2f} ms ({100 * v / total:.0f}%)" for k, v in stages.items())
            + f"; {total:.2f} ms in all")


def verdict(loader: float, synthetic: float, end_to_end: float, workers: int,
            cpu_count: Optional[int], processes_alone: Optional[float] = None) -> Dict:
    """Which sets the pace, from images per second measured alone: the loader ('loader', slower than the
    synthetic step) or the model ('model'); end to end as a fraction of the synthetic step; and where the loader
    binds, the loader processes that would bring end to end to ``TARGET`` of the synthetic step at the measured
    rate per process (an estimate: it assumes that the rate grows in proportion to the processes).

    With ``--device-augment``, ``loader`` is the loader with the device's work and ``processes_alone`` the
    loader processes' own rate: where they alone keep up, the device's work binds ('device augmentation'), and
    more processes would not help."""
    per_process = loader / max(workers, 1)
    pace = 'loader' if loader < synthetic else 'model'
    if pace == 'loader' and processes_alone is not None and processes_alone >= synthetic:
        pace = 'device augmentation'
    needed = math.ceil(TARGET * synthetic / per_process) if pace == 'loader' else None
    return dict(pace=pace, end_to_end_fraction=end_to_end / synthetic, loader_img_per_s=loader,
                synthetic_img_per_s=synthetic, end_to_end_img_per_s=end_to_end, img_per_s_per_process=per_process,
                workers=workers, target_fraction=TARGET, workers_needed_estimate=needed, cpu_count=cpu_count,
                loader_processes_img_per_s=processes_alone)


def describe(v: Dict) -> str:
    """The verdict in words, a few lines."""
    lines = []
    if v['pace'] == 'device augmentation':
        lines.append(f"pace: device augmentation (the loader processes alone make "
                     f"{v['loader_processes_img_per_s']:.1f} img/s, with the device's decoding and augmentation "
                     f"{v['loader_img_per_s']:.1f} img/s, slower than the synthetic step's "
                     f"{v['synthetic_img_per_s']:.1f} img/s; more loader processes would not help)")
    elif v['pace'] == 'loader':
        lines.append(f"pace: loader (alone {v['loader_img_per_s']:.1f} img/s, slower than the synthetic step's "
                     f"{v['synthetic_img_per_s']:.1f} img/s)")
    else:
        lines.append(f"pace: model (the synthetic step's {v['synthetic_img_per_s']:.1f} img/s; the loader alone "
                     f"makes {v['loader_img_per_s']:.1f} img/s)")
    lines.append(f"end to end: {v['end_to_end_img_per_s']:.1f} img/s, {v['end_to_end_fraction']:.2f} of the "
                 f"synthetic step")
    who = 'in the main process' if v['workers'] == 0 else 'per loader process'
    if v['workers_needed_estimate'] is not None:
        n, cores = v['workers_needed_estimate'], v['cpu_count']
        lines.append(f"estimate: about {n} loader processes (-j {n}) for end to end to reach "
                     f"{v['target_fraction']:.0%} of the synthetic step, at the {v['img_per_s_per_process']:.1f} "
                     f"img/s measured {who} (assuming the rate grows in proportion)"
                     + (f"; more than this machine's {cores} CPU cores" if cores and n > cores else ''))
    elif v['end_to_end_fraction'] < v['target_fraction']:
        lines.append(f"note: the loader alone keeps up, yet end to end loses {1 - v['end_to_end_fraction']:.0%} of "
                     f"the synthetic step: the loader and the step compete for this machine's {v['cpu_count']} CPU "
                     f"cores")
    return '\n'.join(lines)
