"""Tiny models, checkpoints and JPEG folders for the analysis, checkpoint-tool and export tests."""
import os
from typing import Dict

import numpy as np
import torch
from PIL import Image

import sequencer

# a four-block Sequencer2D-S that runs in milliseconds on 32-64 px images
TINY = dict(layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64), hidden_sizes=(8, 16, 16, 16))
TINY_ARGS = ["layers=(1,1,1,1)", "embed_dims=(32,64,64,64)", "hidden_sizes=(8,16,16,16)"]

# a few real ImageNet-1K wnids and three of ImageNet-A's 200
WNIDS = ['n01440764', 'n01443537', 'n01484850', 'n01496331', 'n01498041']
IMAGENET_A_WNIDS = ['n01498041', 'n01531178', 'n01534433']


def tiny_model(num_classes: int = 1000, **kw) -> torch.nn.Module:
    return sequencer.create_model('sequencer2d_s', num_classes=num_classes, **{**TINY, **kw})


def constant_head(model: torch.nn.Module, favourite: Dict[int, float]) -> torch.nn.Module:
    """Logits that do not depend on the image: zero weights, the bias giving ``favourite`` classes their
    values (others 0). The predictions on any data are then known in advance."""
    with torch.no_grad():
        model.head.fc.weight.zero_()
        model.head.fc.bias.zero_()
        for i, v in favourite.items():
            model.head.fc.bias[i] = v
    return model


def write_image(path: str, seed: int = 0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.clip(rng.normal(128, 50, size=(size[0], size[1], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def image_folder(root: str, counts: Dict[str, int], seed: int = 0) -> str:
    """``root/<class>/<i>.JPEG`` with ``counts[class]`` images per class."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(os.path.join(root, name, f'{i}.JPEG'), seed=seed + 100 * c + i)
    return str(root)


def save_training_checkpoint(path: str, model: torch.nn.Module, epoch: int = 1, metric=None, ema=None,
                             model_kwargs=None, **extra) -> str:
    """A checkpoint as the training loop writes it (timm's convention)."""
    ckpt = {'epoch': epoch, 'arch': 'sequencer2d_s', 'state_dict': model.state_dict(),
            'optimizer': {'state': {}, 'param_groups': []},
            'args': {'model': 'sequencer2d_s',
                     'model_kwargs': dict(model_kwargs if model_kwargs is not None else TINY)}}
    if metric is not None:
        ckpt['metric'] = metric
    if ema is not None:
        ckpt['state_dict_ema'] = ema
    ckpt.update(extra)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(ckpt, path)
    return path
