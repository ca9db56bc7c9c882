"""The paper's transfer-learning sets, read from their usual on-disk layouts (as downloaded from their
authors' pages), without torchvision's checksum requirements.

* Oxford Flowers-102 (``--dataset flowers102``): ``ROOT/jpg/image_00001.jpg ...``, ``ROOT/imagelabels.mat``,
  ``ROOT/setid.mat`` (ROOT may also be a folder holding ``flowers-102/``). As in the paper, the training
  split is the official train + validation ids and evaluation uses the test ids; ``--val-split val``
  selects the official validation ids alone.
* Stanford Cars (``--dataset stanford_cars``): ``ROOT/cars_train/``, ``ROOT/cars_test/``,
  ``ROOT/devkit/cars_train_annos.mat``, ``ROOT/devkit/cars_meta.mat`` and the test labels in
  ``ROOT/cars_test_annos_withlabels.mat`` (or ``ROOT/devkit/``). ROOT may also hold ``stanford_cars/``.
"""
import os
from typing import List, Tuple

import numpy as np
from torch.utils.data import Dataset

from ..errors import UserError
from .images import open_image


def _loadmat(path: str):
    from scipy.io import loadmat
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing (see the expected layout in `sequencer train --help` / README)")
    try:
        return loadmat(path, squeeze_me=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable .mat file ({type(e).__name__})") from None


def _base(root: str, sub: str, marker: str) -> str:
    return os.path.join(root, sub) if not os.path.exists(os.path.join(root, marker)) and \
        os.path.isdir(os.path.join(root, sub)) else root


class FolderList(Dataset):
    """(path, target) samples with the ``reader.samples`` / ``classes`` interface the loaders use."""

    def __init__(self, samples: List[Tuple[str, int]], classes: List[str]):
        self.samples, self.classes = samples, classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.reader = self  # Samples() reads .reader.samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        return open_image(path), target


def flowers102(root: str, split: str) -> FolderList:
    base = _base(root, 'flowers-102', 'imagelabels.mat')
    labels = _loadmat(os.path.join(base, 'imagelabels.mat'))['labels']
    ids = _loadmat(os.path.join(base, 'setid.mat'))
    key = {'train': ('trnid', 'valid'), 'val': ('valid',), 'test': ('tstid',), 'validation': ('tstid',)}.get(split)
    if key is None:
        raise UserError(f"flowers102: unknown split {split!r} (train, val, test, validation)")
    chosen = [int(i) for k in key for i in np.atleast_1d(ids[k]).ravel()]
    samples = [(os.path.join(base, 'jpg', f'image_{i:05d}.jpg'), int(labels[i - 1]) - 1) for i in chosen]
    return FolderList(samples, [str(c) for c in range(1, 103)])


def stanford_cars(root: str, split: str) -> FolderList:
    base = _base(root, 'stanford_cars', 'devkit')
    part = 'train' if split == 'train' else 'test'
    if part == 'train':
        annos = _loadmat(os.path.join(base, 'devkit', 'cars_train_annos.mat'))['annotations']
    else:
        name = 'cars_test_annos_withlabels.mat'
        path = os.path.join(base, name) if os.path.isfile(os.path.join(base, name)) else \
            os.path.join(base, 'devkit', name)
        annos = _loadmat(path)['annotations']
    names = [str(n) for n in _loadmat(os.path.join(base, 'devkit', 'cars_meta.mat'))['class_names']]
    samples = [(os.path.join(base, f'cars_{part}', str(a['fname'])), int(a['class']) - 1)
               for a in np.atleast_1d(annos).ravel()]
    return FolderList(samples, names)


TRANSFER_SETS = {'flowers102': flowers102, 'stanford_cars': stanford_cars}
