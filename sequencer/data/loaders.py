"""Datasets and loaders, from timm's factories; this module only resolves arguments and checks paths."""
import os
from typing import Dict, Optional, Sequence

import torch
from timm.data import create_dataset, create_loader, resolve_data_config

from ..errors import UserError


def data_config(model: torch.nn.Module, img_size: Optional[int] = None, input_size: Optional[Sequence[int]] = None,
                crop_pct: Optional[float] = None, interpolation: Optional[str] = None,
                mean=None, std=None) -> Dict:
    """The model's evaluation transform (bicubic, crop_pct, mean / std), overridden where arguments are given."""
    args = dict(img_size=img_size, input_size=tuple(input_size) if input_size else None, crop_pct=crop_pct,
                interpolation=interpolation or '', mean=mean, std=std)
    return resolve_data_config({k: v for k, v in args.items() if v is not None}, model=model)


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


def create_eval_loader(dataset, cfg: Dict, batch_size: int = 64, workers: int = 2, distributed: bool = False,
                       device: torch.device = torch.device('cpu')):
    """A deterministic evaluation loader with the transform described by ``cfg`` (see ``data_config``)."""
    return create_loader(
        dataset, input_size=cfg['input_size'], batch_size=batch_size, is_training=False, use_prefetcher=False,
        interpolation=cfg['interpolation'], mean=cfg['mean'], std=cfg['std'], crop_pct=cfg['crop_pct'],
        crop_mode=cfg.get('crop_mode'), num_workers=workers, distributed=distributed,
        pin_memory=device.type == 'cuda', device=device, persistent_workers=False)
