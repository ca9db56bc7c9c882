"""Datasets and loaders, from timm's factories; this module only resolves arguments and checks paths."""
import math
import os
from typing import Dict, Optional, Sequence

import torch
from timm.data import auto_augment, create_dataset, resolve_data_config

from ..errors import UserError


def data_config(model: torch.nn.Module, img_size: Optional[int] = None, input_size: Optional[Sequence[int]] = None,
                crop_pct: Optional[float] = None, interpolation: Optional[str] = None,
                mean=None, std=None, flag: str = '--img-size') -> Dict:
    """The model's evaluation transform (bicubic, crop_pct, mean / std), overridden where arguments are given.
    An input the model cannot take is a one-line error naming ``flag``."""
    args = dict(img_size=img_size, input_size=tuple(input_size) if input_size else None, crop_pct=crop_pct,
                interpolation=interpolation or '', mean=mean, std=std)
    cfg = resolve_data_config({k: v for k, v in args.items() if v is not None}, model=model)
    fit_channels(cfg, input_size[0] if input_size else getattr(model, 'in_chans', 3))
    check_input_size(model, cfg['input_size'], flag)
    return cfg


def fit_channels(cfg: Dict, channels: int) -> Dict:
    """A resolved data config (timm's ``resolve_data_config``) for ``channels`` input channels: its input size,
    mean and std. Returns ``cfg``, changed in place."""
    cfg['input_size'] = (channels, *cfg['input_size'][1:])
    for key in ('mean', 'std'):
        cfg[key] = per_channel(cfg[key], channels)
    return cfg


def per_channel(values, channels: int) -> tuple:
    """Normalisation constants for ``channels`` channels (a model's RGB mean for a grayscale input: their mean)."""
    values = tuple(values)
    return values if len(values) == channels else (sum(values) / len(values),) * channels


def check_input_size(model: torch.nn.Module, input_size: Sequence[int], flag: str = '--img-size') -> None:
    """One line where an input side is below the model's total patch size (its stem and downsampling layers
    would be left with an empty feature map)."""
    patch = math.prod(getattr(model, 'patch_sizes', None) or (1,))
    if min(input_size[-2:]) < patch:
        raise UserError(f"{flag} {'x'.join(map(str, input_size[-2:]))}: smaller than the model's total patch size "
                        f"{patch}, the smallest input it takes")


def check_data_dir(data_dir: str, dataset: str = '') -> None:
    if dataset.startswith(('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')):
        return
    if not data_dir or not os.path.isdir(data_dir):
        raise UserError(f"{data_dir or '(empty)'}: data directory does not exist")


def create_eval_dataset(data_dir: str, split: str = 'validation', dataset: str = '', class_map: str = '',
                        download: bool = False):
    check_data_dir(data_dir, dataset)
    try:
        ds = create_dataset(dataset, root=data_dir, split=split, is_training=False, class_map=class_map,
                            download=download)
    except (FileNotFoundError, RuntimeError, AssertionError) as e:
        raise UserError(f"{data_dir}: cannot read split {split!r} ({e})") from None
    if len(ds) == 0:
        raise UserError(f"{data_dir}: split {split!r} holds no images")
    return ds


def create_eval_loader(dataset, cfg: Dict, batch_size: int = 64, workers: int = 2,
                       device: torch.device = torch.device('cpu'), bad_samples: str = 'fail'):
    """A deterministic evaluation loader with the transform described by ``cfg`` (see ``data_config``). An
    unreadable image stops it with one line naming the file, as in validate (``bad_samples='skip'``: skipped
    and counted in the batches' third field)."""
    from timm.data import create_transform

    from .datasets import Samples, ShardSampler, make_loader
    transform = create_transform(cfg['input_size'], is_training=False, interpolation=cfg['interpolation'],
                                 mean=cfg['mean'], std=cfg['std'], crop_pct=cfg['crop_pct'],
                                 crop_mode=cfg.get('crop_mode'))
    return make_loader(Samples(dataset, transform, bad_samples=bad_samples),
                       ShardSampler(len(dataset), shuffle=False, drop_last=False), batch_size, workers,
                       device.type == 'cuda')


def posterize_keeps_zero_bits() -> None:
    """RandAugment's posterize in timm (``rand-...-inc1``, the paper's policy) asks for 0 bits at the largest
    magnitude, which Pillow up to 12 turned into a black image and Pillow 13 refuses (``ValueError: bits must be
    between ... 1 and 8``): training would stop on an arbitrary image about once per thousand. This makes timm's
    posterize ops return that black image again (the same result as before, whatever the Pillow version).
    Idempotent."""
    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize


def _posterize(img, bits_to_keep, **kwargs):
    if bits_to_keep <= 0:   # every bit masked off, as ImageOps.posterize computed it before Pillow 13
        return img.point([0] * 256 * len(img.getbands()))
    return auto_augment.posterize(img, bits_to_keep, **kwargs)
