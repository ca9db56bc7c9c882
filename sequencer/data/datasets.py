"""Datasets for training and evaluation.

Datasets come from timm's ``create_dataset`` (folders, torch/cifar10, torch/cifar100, ...) or the readers of
``transfer.py`` (Oxford Flowers-102, Stanford Cars). ``Samples`` wraps any of them so that

* every sample's augmentation is seeded from (seed, epoch, index): the same images and augmentations
  whatever the number of workers or processes, and a resumed run sees exactly what an uninterrupted one
  would have seen;
* an unreadable image fails with one line naming the file, or is skipped and counted (``bad_samples``),
  instead of being silently replaced by the next one.
"""
import os
import random
import signal
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_dataset
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import UserError, first_line
from .transfer import TRANSFER_SETS

class BadSampleError(UserError):
    pass


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def _open_image(path) -> Image.Image:
    """An RGB image: EXIF orientation applied; grayscale, CMYK, RGBA, palette and 16-bit converted.
    Truncated files, non-images and decompression bombs raise (PIL's limit on pixel count applies)."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):  # 16-bit: keep the high byte, not a clipped copy
            # always scaled from the 16-bit range: a dark image (every value below 256) stays dark
            arr = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
            img = Image.fromarray((arr >> 8).astype(np.uint8))
        elif img.mode == 'P' and 'transparency' in img.info:
            img = img.convert('RGBA')
        return img.convert('RGB')


def check_image_folder(root: str, split_dir: str, class_map: str = ''):
    """Empty class folders and class-map entries without a folder are errors naming them."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    for name in classes:
        folder = os.path.join(split_dir, name)
        if not any(f.lower().endswith(IMAGE_EXTENSIONS) for _, _, files in os.walk(folder) for f in files):
            raise UserError(f"{folder}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} images)")
    if class_map and classes:
        path = class_map if os.path.exists(class_map) else os.path.join(root, class_map)
        if not os.path.isfile(path):
            raise UserError(f"{class_map}: class map file not found")
        if path.endswith('.txt'):
            with open(path, encoding='utf-8') as f:
                names = [line.strip() for line in f if line.strip()]
            missing = [n for n in names if n not in classes]
            if missing:
                raise UserError(f"{class_map}: names class {missing[0]!r} which has no folder in {split_dir}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ''))


def build_dataset(name: str, root: str, split: str, training: bool, class_map: str = '', download: bool = False):
    """A dataset without transform: a folder (ImageFolder layout), a transfer set (flowers102, stanford_cars),
    or any type timm's ``create_dataset`` knows (torch/cifar10, torch/cifar100, ...)."""
    name = name or ''
    key = name.lower().replace('torch/', '')
    if key in TRANSFER_SETS:
        if not os.path.isdir(root or ''):
            raise UserError(f"{root}: data directory does not exist")
        return TRANSFER_SETS[key](root, split)
    if not name.startswith(('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')) and not os.path.isdir(root or ''):
        raise UserError(f"{root or '(no data path given)'}: data directory does not exist")
    if not name:
        split_dir = _split_dir(root, split)
        if split_dir is None:
            raise UserError(f"{root}: no {split!r} split folder found (expected "
                            f"{os.path.join(root, _split_hint(split))}/)")
        check_image_folder(root, split_dir, class_map)
    try:
        ds = create_dataset(name, root=root, split=split, is_training=training, class_map=class_map,
                            download=download)
    except (FileNotFoundError, RuntimeError, AssertionError, ValueError, OSError) as e:
        why = first_line(e).replace('You can use download=True to download it', 'pass --dataset-download to '
                                    'download it')   # torchvision's advice, in this command line's words
        raise UserError(f"{root}: cannot read split {split!r} ({why})") from None
    if len(ds) == 0:
        raise UserError(f"{root}: split {split!r} holds no images")
    return ds


def _split_hint(split: str) -> str:
    return 'val' if split in ('validation', 'val', 'valid', 'eval', 'evaluation') else split


def _split_dir(root: str, split: str) -> Optional[str]:
    """The folder timm will read for ``split``: its synonym folder, or ``root`` itself when no split
    folders exist at all (a plain class-folder tree); None when the split is missing."""
    names = {'train': ('train', 'training'),
             'val': ('val', 'valid', 'validation', 'eval', 'evaluation')}.get(_split_hint(split), (split,))
    for n in names:
        if os.path.isdir(os.path.join(root, n)):
            return os.path.join(root, n)
    if any(os.path.isdir(os.path.join(root, n)) for n in ('train', 'training', 'val', 'validation', 'test')):
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
    """Seeded, explicit-error view of a dataset: ``(image_tensor, target)`` or ``None`` for a skipped sample."""

    def __init__(self, dataset, transform, seed: int = 0, bad_samples: str = 'fail'):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.bad_samples = bad_samples
        reader = getattr(dataset, 'reader', None)
        self._samples = getattr(reader, 'samples', None)  # timm folder reader: [(path, target), ...]

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def _load(self, index):
        if self._samples is not None:
            path, target = self._samples[index]
            try:
                img = _open_image(path)
            except Exception as e:  # PIL raises many types for broken files
                raise BadSampleError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
            return img, target, path
        img, target = self.dataset[index]
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        return img.convert('RGB'), target, f"sample {index}"

    def __getitem__(self, index):
        try:
            img, target, where = self._load(index)
        except BadSampleError:
            if self.bad_samples == 'skip':
                return None
            raise
        if self.transform is None:
            return img, target
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        s = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        random.seed(s)
        np.random.seed(s % 2 ** 32)
        torch.manual_seed(s)
        try:
            return self.transform(img), target
        except Exception as e:
            raise BadSampleError(f"{where}: cannot be transformed ({type(e).__name__}: {e})") from None
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


class ShardSampler(Sampler):
    """This process's share of an epoch: a permutation seeded by (seed, epoch) when shuffling, split
    round-robin over ``world_size`` processes, optionally starting after ``skip`` batches' worth."""

    def __init__(self, n: int, world_size: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, batch_size: int = 1):
        self.n, self.world, self.rank, self.shuffle, self.seed = n, world_size, rank, shuffle, seed
        self.drop_last, self.batch_size = drop_last, batch_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0):
        self.epoch, self.skip = epoch, skip_batches

    def indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:  # every process gets the same whole number of batches
            per = len(order) // (self.world * self.batch_size) * self.batch_size
            order = order[:per * self.world]
        mine = order[self.rank::self.world]
        return mine[self.skip * self.batch_size:]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self):
        return len(self.indices())


def collate_skipping(batch):
    """Default collation, dropping skipped (None) samples; returns (images, targets, number skipped)."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
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
