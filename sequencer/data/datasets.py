"""Datasets for training and evaluation.

Datasets come from timm's ``create_dataset`` (folders, torch/cifar10, torch/cifar100, ...) or the readers of
``transfer.py`` (Oxford Flowers-102, Stanford Cars). ``Samples`` wraps any of them so that

* every sample's augmentation is seeded from (seed, epoch, index): the same images and augmentations
  whatever the number of workers or processes, and a resumed run sees exactly what an uninterrupted one
  would have seen;
* an unreadable image fails with one line naming the file, or is skipped and counted (``bad_samples``),
  instead of being silently replaced by the next one;
* images are decoded by ``images.open_image``, the decoder of every command.

A sampler yields dataset indices, or ``(index, variant)`` pairs where one image is seen several times an epoch
(``--aug-repeats``, ``--epoch-repeats``): each variant gets its own augmentation.
"""
import collections
import contextlib
import math
import os
import random
import signal
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import create_dataset
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.loader import PrefetchLoader
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from ..errors import UserError, first_line
from .device_augment import DecodeError, DeviceAugment, EncodedImage, Planned
from .images import open_image
from .transfer import TRANSFER_SETS


class BadSampleError(UserError):
    pass


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def class_map_lines(path: str, label: Optional[str] = None) -> list:
    """The non-empty lines of a class-map text file, stripped; a file that cannot be read or is not UTF-8 text
    is one line naming it (as ``label``, default ``path``)."""
    label = label or path
    try:
        with open(path, encoding='utf-8') as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"{label}: cannot read class map ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{label}: not a UTF-8 text file (a class map has one class name per line)") from None


def check_image_folder(root: str, split_dir: str, class_map: str = ''):
    """Images directly in the split folder (no class folders), empty class folders and class-map entries without a
    folder are errors naming them."""
    entries = list(os.scandir(split_dir))
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes and any(e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith('.') for e in entries):
        raise UserError(f"{split_dir}: images directly in the split folder; put them in one folder per class")
    for name in classes:
        folder = os.path.join(split_dir, name)
        if not any(f.lower().endswith(IMAGE_EXTENSIONS) for _, _, files in os.walk(folder) for f in files):
            raise UserError(f"{folder}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} images)")
    if class_map and classes:
        path = class_map if os.path.exists(class_map) else os.path.join(root, class_map)
        if not os.path.isfile(path):
            raise UserError(f"{class_map}: class map file not found")
        if path.endswith('.txt'):
            names = class_map_lines(path, class_map)
            missing = [n for n in names if n not in classes]
            if missing:
                raise UserError(f"{class_map}: names class {missing[0]!r} which has no folder in {split_dir}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ''))


def build_dataset(name: str, root: str, split: str, training: bool, class_map: str = '', download: bool = False,
                  root_as_split: bool = True):
    """A dataset without transform: a folder (ImageFolder layout), a transfer set (flowers102, stanford_cars),
    or any type timm's ``create_dataset`` knows (torch/cifar10, torch/cifar100, ...).

    A folder's ``split`` is its sub-folder of that name or a synonym (val/ for 'validation'). Where no split
    folder exists at all, the root itself is the split when ``root_as_split`` (a plain tree of class folders to
    evaluate); otherwise (training, which must not evaluate on its own images) the missing folder is named in a
    ``UserError``; the split '.' names the root explicitly. Streamed datasets (tfds/, wds/, hfids/) are refused:
    the samples are read by index."""
    name = name or ''
    key = name.lower().replace('torch/', '')
    if key in TRANSFER_SETS:
        if not os.path.isdir(root or ''):
            raise UserError(f"{root}: data directory does not exist")
        return TRANSFER_SETS[key](root, split)
    if not name.startswith(('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')) and not os.path.isdir(root or ''):
        raise UserError(f"{root or '(no data path given)'}: data directory does not exist")
    if not name:
        split_dir = _split_dir(root, split, root_as_split)
        if split_dir is None:
            raise UserError(f"{root}: no {split!r} split folder found (expected "
                            f"{os.path.join(root, _split_hint(split))}/" + ("" if root_as_split else
                            ", one folder per class; --train-split / --val-split name other folders, '.' the "
                            "root itself") + ")")
        check_image_folder(root, split_dir, class_map)
    try:
        ds = create_dataset(name, root=root, split=split, is_training=training, class_map=class_map,
                            download=download)
    except (FileNotFoundError, RuntimeError, AssertionError, ValueError, OSError) as e:
        why = first_line(e).replace('You can use download=True to download it', 'pass --dataset-download to '
                                    'download it')   # torchvision's advice, in this command line's words
        raise UserError(f"{root}: cannot read split {split!r} ({why})") from None
    if isinstance(ds, IterableDataset):
        raise UserError(f"--dataset {name}: a streamed dataset, which is read in order, not by index as the samples "
                        f"here are; use a folder, torch/* or hfds/*")
    if len(ds) == 0:
        raise UserError(f"{root}: split {split!r} holds no images")
    return ds


def _split_hint(split: str) -> str:
    return 'val' if split in ('validation', 'val', 'valid', 'eval', 'evaluation') else split


def _split_dir(root: str, split: str, root_as_split: bool = True) -> Optional[str]:
    """The folder timm will read for ``split``: its own or a synonym's folder, or (``root_as_split``) ``root``
    itself when no split folders exist at all (a plain class-folder tree); None when the split is missing."""
    if os.path.isdir(os.path.join(root, split)):   # as timm looks first (the root itself for '.')
        return os.path.join(root, split)
    names = {'train': ('train', 'training'),
             'val': ('val', 'valid', 'validation', 'eval', 'evaluation')}.get(_split_hint(split), (split,))
    for n in names:
        if os.path.isdir(os.path.join(root, n)):
            return os.path.join(root, n)
    if not root_as_split or any(os.path.isdir(os.path.join(root, n))
                                for n in ('train', 'training', 'val', 'validation', 'test')):
        return None
    return root


def num_classes_of(ds) -> Optional[int]:
    reader = getattr(ds, 'reader', None)
    if reader is not None and getattr(reader, 'class_to_idx', None):
        return len(reader.class_to_idx)
    for attr in ('classes', 'class_to_idx'):
        if getattr(ds, attr, None):
            return len(getattr(ds, attr))
    return None


def class_names_of(ds) -> Optional[list]:
    reader = getattr(ds, 'reader', None)
    mapping = getattr(reader, 'class_to_idx', None) or getattr(ds, 'class_to_idx', None)
    if mapping:
        return [k for k, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    return list(getattr(ds, 'classes', []) or []) or None


def class_difference(recorded, found) -> Optional[str]:
    """Where the class names a model was trained on (``recorded``, a checkpoint's ``class_names``) and a dataset's
    (``found``) first differ, in words; None where they agree or either is unknown. Their order decides which
    output is which class."""
    if not isinstance(recorded, (list, tuple)) or not found or list(recorded) == list(found):
        return None
    n = min(len(recorded), len(found))
    i = next((i for i in range(n) if recorded[i] != found[i]), n)
    if i < n:
        return f"class {i} is {found[i]!r} in the data, {recorded[i]!r} in training"
    return f"{len(found)} classes in the data, {len(recorded)} in training"


class Samples(Dataset):
    """Seeded, explicit-error view of a dataset: ``(image_tensor, target)`` or ``None`` for a skipped sample.

    An item is a dataset index or an ``(index, variant)`` pair (see the module's docstring); images are decoded
    to ``img_mode`` ('RGB', or 'L' for one-channel models)."""

    def __init__(self, dataset, transform, seed: int = 0, bad_samples: str = 'fail', img_mode: str = 'RGB'):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.bad_samples = bad_samples
        self.img_mode = img_mode
        reader = getattr(dataset, 'reader', None)
        self._samples = getattr(reader, 'samples', None)  # timm folder reader: [(path, target), ...]

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def image(self, index: int):
        """The decoded image of sample ``index``, before any transform (timing the loader's stages)."""
        return self._load(index)[0]

    def _load(self, index):
        if self._samples is not None:
            path, target = self._samples[index]
            try:
                # a transform that reads files itself (--device-augment's Plan) gets the file undecoded
                img = EncodedImage(path, self.img_mode) if getattr(self.transform, 'reads_files', False) \
                    else open_image(path, self.img_mode)
            except Exception as e:  # PIL raises many types for broken files
                raise BadSampleError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
            return img, target, path
        img, target = self.dataset[index]
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        return img.convert(self.img_mode), target, f"sample {index}"

    def __getitem__(self, item):
        index, variant = item if isinstance(item, tuple) else (item, 0)
        try:
            img, target, where = self._load(index)
        except BadSampleError:
            if self.bad_samples == 'skip':
                return None
            raise
        if self.transform is None:
            return img, target
        with seeded((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index + variant * 2 ** 48):
            try:
                return self.transform(img), target
            except Exception as e:
                raise BadSampleError(f"{where}: cannot be transformed ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def seeded(seed: int):
    """Python's, numpy's and torch's CPU generators seeded from ``seed`` inside, the caller's states restored
    after. Only torch's CPU generator: ``torch.manual_seed`` would also reseed every device's (and take 0.1 ms, a
    noticeable share of a loader process's time per image). In a loader process, where every sample seeds its
    own draws and nothing else draws, the states are not kept (another 0.1 ms per image)."""
    keep = get_worker_info() is None
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if keep else None
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.default_generator.manual_seed(seed % 2 ** 63)
    try:
        yield
    finally:
        if keep:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


class ShardSampler(Sampler):
    """This process's share of an epoch: a permutation seeded by (seed, epoch) when shuffling, split
    round-robin over ``world_size`` processes, optionally starting after ``skip`` batches' worth.

    ``repeats`` (timm's ``--epoch-repeats``): an epoch passes over the data ``max(1, repeats)`` times (a new
    permutation each pass, the passes after the first as variants of their images)."""

    def __init__(self, n: int, world_size: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, batch_size: int = 1, repeats: float = 0):
        self.n, self.world, self.rank, self.shuffle, self.seed = n, world_size, rank, shuffle, seed
        self.drop_last, self.batch_size, self.repeats = drop_last, batch_size, repeats
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0):
        self.epoch, self.skip = epoch, skip_batches

    def _epoch_order(self) -> list:
        """Every process's items of the epoch, in order."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        total = math.ceil(max(1.0, self.repeats) * self.n)
        order = []
        for variant in range(math.ceil(total / self.n)):
            part = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
            order += part if variant == 0 else [(i, variant) for i in part]
        return order[:total]

    def _mine(self) -> list:
        """This process's items of the epoch, every process with the same whole number of batches (drop_last)."""
        order = self._epoch_order()
        if self.drop_last:
            per = len(order) // (self.world * self.batch_size) * self.batch_size
            order = order[:per * self.world]
        return order[self.rank::self.world]

    def indices(self) -> list:
        return self._mine()[self.skip * self.batch_size:]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self):
        return len(self.indices())


class RepeatAugShards(ShardSampler):
    """Repeated augmentation (``--aug-repeats``): timm's ``RepeatAugSampler`` picks this process's images (each
    image ``repeats`` times an epoch, its copies spread over the processes), with or without torch.distributed;
    every copy is a variant of its image, so it gets its own augmentation."""

    def __init__(self, n: int, repeats: float, world_size: int = 1, rank: int = 0, seed: int = 0,
                 batch_size: int = 1):
        super().__init__(n, world_size, rank, shuffle=True, seed=seed, drop_last=True, batch_size=batch_size)
        self.timm_sampler = RepeatAugSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True,
                                             num_repeats=repeats)

    def _mine(self) -> list:
        self.timm_sampler.set_epoch(self.seed + self.epoch)
        picked = list(self.timm_sampler)
        picked = picked[:len(picked) // self.batch_size * self.batch_size]
        seen = collections.Counter()
        mine = []
        for i in picked:
            variant = seen[i] * self.world + self.rank
            seen[i] += 1
            mine.append(i if variant == 0 else (i, variant))
        return mine


def collate_skipping(batch):
    """Default collation, dropping skipped (None) samples; returns (images, targets, number skipped)."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    if isinstance(kept[0][0], Planned):   # --device-augment: files and drawn parameters, decoded on the device
        return [b[0] for b in kept], torch.tensor([b[1] for b in kept]), skipped
    images, targets = torch.utils.data.default_collate(kept)
    return images, targets, skipped


def _seed_worker(worker_id):
    # Ctrl-C goes to the whole process group: let the main process handle it (save, then stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the sample seeding above makes augmentation independent of this; keep library RNGs distinct anyway
    s = torch.initial_seed() % 2 ** 32
    random.seed(s)
    np.random.seed(s)


def make_loader(samples: Samples, sampler: ShardSampler, batch_size: int, workers: int, pin_memory: bool = False):
    return DataLoader(samples, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_skipping, pin_memory=pin_memory, drop_last=sampler.drop_last,
                      worker_init_fn=_seed_worker, persistent_workers=False,
                      generator=torch.Generator().manual_seed(sampler.seed))


class Prefetched:
    """timm's ``PrefetchLoader`` (``--no-prefetcher`` turns it off) over a ``make_loader`` loader whose transform
    leaves uint8 images (timm's ``create_transform(..., use_prefetcher=True)``): the next batch is copied to
    ``device`` on a side stream and normalised (and randomly erased: ``re_*``, as timm's ``create_loader`` passes
    them) there, while the current one trains. Yields ``(images, targets, skipped)`` like the loader, ``images``
    None for a batch whose every sample was skipped."""

    def __init__(self, loader: DataLoader, input_size: Sequence[int], mean, std, device: torch.device,
                 re_prob: float = 0., re_mode: str = 'const', re_count: int = 1, re_num_splits: int = 0,
                 device_augment: Optional[DeviceAugment] = None):
        self.loader, self.input_size, self.device_augment = loader, tuple(input_size), device_augment
        self.skipped: collections.deque = collections.deque()   # per batch, in the order the loader made them
        self.prefetcher = PrefetchLoader(_Pairs(self), mean=tuple(mean), std=tuple(std), channels=input_size[0],
                                         device=device, re_prob=re_prob, re_mode=re_mode, re_count=re_count,
                                         re_num_splits=re_num_splits)

    def pairs(self):
        for images, targets, skipped in self.loader:
            if isinstance(images, list):   # --device-augment: decoded and augmented here, on the prefetch stream
                images, targets, failed = self.on_device(images, targets)
                skipped += failed
            self.skipped.append(skipped)
            if images is None:   # PrefetchLoader takes tensors: an empty batch stands for "all skipped"
                images = torch.zeros((0, *self.input_size), dtype=torch.uint8)
                targets = torch.zeros(0, dtype=torch.long)
            yield images, targets

    def on_device(self, planned, targets):
        stream = self.prefetcher.stream
        context = contextlib.nullcontext()
        if stream is not None:   # after the consumer's queued work, as PrefetchLoader's own copies
            stream.wait_stream(torch.cuda.current_stream(self.prefetcher.device))
            context = torch.cuda.stream(stream)
        with context:
            try:
                images, kept, failures = self.device_augment(planned)
            except DecodeError as e:
                raise BadSampleError(str(e)) from None
        if len(kept) < len(planned):
            targets = targets[torch.tensor(kept, dtype=torch.long)]
        return (images if kept else None), targets, len(failures)

    def __iter__(self):
        self.skipped.clear()
        for images, targets in self.prefetcher:
            skipped = self.skipped.popleft()
            yield (None, None, skipped) if images.shape[0] == 0 else (images, targets, skipped)

    def __len__(self):
        return len(self.loader)


class _Pairs:
    """The ``(images, targets)`` pairs PrefetchLoader iterates over."""

    def __init__(self, owner: Prefetched):
        self.owner = owner

    def __iter__(self):
        return self.owner.pairs()

    def __len__(self):
        return len(self.owner.loader)


class SplitErasing:
    """``--resplit`` without the prefetcher: timm's ``RandomErasing`` over whole batches with two splits, which
    leaves the first half of every batch clean (what timm's prefetcher does on the device), seeded by (seed,
    epoch, step, rank) so that a resumed run erases as an uninterrupted one."""

    def __init__(self, prob: float, mode: str, count: int, seed: int):
        self.erase = RandomErasing(prob, mode=mode, max_count=count, num_splits=2, device='cpu')
        self.seed = seed

    def __call__(self, images: torch.Tensor, epoch: int, step: int, rank: int) -> torch.Tensor:
        with seeded(((self.seed * 1_000_003 + epoch) * 10_000_019 + step) * 1_009 + rank):
            return self.erase(images)
