"""Effective receptive fields (ERF), following the protocol of the paper's reference code.

For every image (a batch of one) and every requested stage, the channels of the stage's output at its
centre position are summed and differentiated with respect to the input image; the gradient is passed
through a ReLU and summed over the images and over the three input channels. The map that is saved and
drawn is ``log10(sum + 1)``. The centre of an H x W map is ``((H - 1) // 2, (W - 1) // 2)``, which is the
reference code's ``(H // 2 - 1, W // 2 - 1)`` for the even maps of 224 px inputs.

Images get the model's evaluation transform (resize, centre crop, normalise) at ``img_size``. The
recurrent layers are put in training mode while gradients are taken (cuDNN computes RNN backward passes
only in that mode; they have no dropout, so their outputs are unchanged) and run on the native engine.
"""
import argparse
import csv
import io
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..data.images import load_image
from ..engine.args import COUNT, NATURAL
from ..engine.io import atomic_open, check_output, write_with
from ..engine.loading import add_model_arguments, list_images, model_from_args, resolve_device
from ..errors import UserError
from ..fast import set_engine

__all__ = ['erf_sums', 'erf_map', 'area_ratio', 'save_heatmaps']

AREA_THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


def _stage_count(model: nn.Module) -> int:
    return len(model.stages)


def _prepare(model: nn.Module) -> nn.Module:
    model.eval()
    set_engine(model, 'native')
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            m.train()  # cuDNN's RNN backward needs training mode; these modules have no dropout
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def erf_sums(model: nn.Module, images, stages: Sequence[int], log=None, log_seconds: float = 10.0,
             total: Optional[int] = None) -> Dict[int, np.ndarray]:
    """Per stage, the ReLU'd input gradient of the summed centre features, summed over images and channels.

    ``images``: an iterable of (3, H, W) tensors, already transformed; every image is its own batch of one.
    Returns float64 arrays of shape (H, W) (before the log). ``log`` gets a progress line at most every
    ``log_seconds`` (``total``: the number of images, for the message).
    """
    _prepare(model)
    n_stages = _stage_count(model)
    bad = [s for s in stages if not 0 <= s < n_stages]
    if bad:
        raise UserError(f"stage(s) {bad} out of range: the model has stages 0..{n_stages - 1}")
    stages = sorted(set(stages))
    device = next(model.parameters()).device
    sums: Dict[int, torch.Tensor] = {}
    count, start = 0, time.time()
    last_log = start
    for img in images:
        x = img.unsqueeze(0).to(device).requires_grad_(True)
        feats = model.forward_intermediates(x, indices=stages, intermediates_only=True, stop_early=True)
        for i, (stage, feat) in enumerate(zip(stages, feats)):
            h, w = feat.shape[-2:]
            target = feat[:, :, (h - 1) // 2, (w - 1) // 2].sum()
            grad, = torch.autograd.grad(target, x, retain_graph=i < len(stages) - 1)
            contrib = torch.relu(grad).sum(dim=(0, 1)).double().cpu()
            sums[stage] = sums[stage] + contrib if stage in sums else contrib
        count += 1
        now = time.time()
        if log is not None and (now - last_log >= log_seconds or count == total):
            last_log = now
            log(f"erf: {count}{f'/{total}' if total else ''} images ({count / (now - start):.2f} img/s)")
    if count == 0:
        raise UserError("no images to compute the ERF from")
    return {s: sums[s].numpy() for s in stages}


def erf_map(summed: np.ndarray) -> np.ndarray:
    """The saved / drawn ERF: log10(summed gradient + 1)."""
    return np.log10(summed + 1.0)


def area_ratio(summed: np.ndarray, threshold: float) -> float:
    """The smallest fraction of the input area whose pixels hold ``threshold`` of the total contribution
    (a single number for how far the ERF spreads: larger means wider)."""
    flat = np.sort(summed.ravel())[::-1]
    total = flat.sum()
    if total <= 0:
        return float('nan')
    needed = int(np.searchsorted(np.cumsum(flat) / total, threshold) + 1)
    return min(needed, flat.size) / flat.size


def save_heatmaps(maps: Dict[int, np.ndarray], output: str, title: str = '', combined: str = 'erf.png',
                  cmap: str = 'pink') -> List[str]:
    """One PNG per stage (``erf_stage{i}.png``) and all stages side by side (``combined``), on one colour
    scale (the min and max over all stages, as the reference code scales its maps jointly)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    lo = min(float(m.min()) for m in maps.values())
    hi = max(float(m.max()) for m in maps.values())
    hi = hi if hi > lo else lo + 1.0
    written = []

    def save(fig, path):
        buf = io.BytesIO()
        fig.savefig(buf, format='png', dpi=120, bbox_inches='tight')
        plt.close(fig)
        write_with(path, lambda f: f.write(buf.getvalue()))
        written.append(path)

    for stage, m in maps.items():
        fig, ax = plt.subplots(figsize=(4, 3.6))
        im = ax.imshow(m, cmap=cmap, vmin=lo, vmax=hi)
        ax.set_title(f"{title} stage {stage}".strip(), fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label='log10(gradient + 1)')
        save(fig, os.path.join(output, f'erf_stage{stage}.png'))
    if combined:
        fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps) + 0.8, 3.4), squeeze=False)
        for ax, (stage, m) in zip(axes[0], maps.items()):
            im = ax.imshow(m, cmap=cmap, vmin=lo, vmax=hi)
            ax.set_title(f"stage {stage}", fontsize=10)
            ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(im, ax=list(axes[0]), fraction=0.02, pad=0.02, label='log10(gradient + 1)')
        if title:
            fig.suptitle(title, fontsize=10)
        save(fig, os.path.join(output, combined))
    return written


# ---- command --------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser):
    parser.description = (
        "Effective receptive field of each stage, as in the paper's ERF visualisation: for K images, one at a time, "
        "the gradient of the summed centre-position features of a stage's output with respect to the input, "
        "ReLU, summed over the images and the colour channels, log10(x + 1). Writes erf_stage<i>.npy (that "
        "array), erf_stage<i>.png (its heatmap), erf.png (all stages on one colour scale) and erf.csv (the "
        "fraction of the image area holding 20/30/50/99% of the gradient, per stage).")
    parser.add_argument('data', metavar='DATA', help='an image folder (ImageFolder layout or plain images, '
                        'searched recursively) or image files')
    add_model_arguments(parser)
    parser.add_argument('--img-size', type=COUNT, default=None,
                        help="input resolution (default: the run's training resolution, else the model's)")
    parser.add_argument('--num-images', '-k', type=COUNT, default=32,
                        help='images used: the first K, sorted (default: %(default)s)')
    parser.add_argument('--stages', type=NATURAL, nargs='+', default=None,
                        help='stages to analyse (default: all)')
    parser.add_argument('--output', '-o', required=True, metavar='DIR', help='output folder')


def run(args) -> int:
    import timm.data

    check_output(args.output, '--output', folder=True)
    paths = list_images([args.data])[:args.num_images]
    device = resolve_device(args.device)
    loaded = model_from_args(args, device=device)
    model = loaded.model
    if not hasattr(model, 'forward_intermediates'):
        raise UserError(f"{loaded.name}: no forward_intermediates; ERF needs a Sequencer model")
    cfg = loaded.data_config(img_size=args.img_size)
    transform = timm.data.create_transform(**cfg, is_training=False)
    stages = args.stages if args.stages is not None else list(range(_stage_count(model)))
    size = cfg['input_size'][-1]
    print(f"erf: {loaded.label}, {len(paths)} images at {size} px, stages {stages}")
    sums = erf_sums(model, (transform(load_image(p)) for p in paths), stages, log=print, total=len(paths))
    maps = {s: erf_map(v) for s, v in sums.items()}
    os.makedirs(args.output, exist_ok=True)
    for s, m in maps.items():
        write_with(os.path.join(args.output, f'erf_stage{s}.npy'), lambda f, m=m: np.save(f, m.astype(np.float32)))
    title = f"{loaded.label}, {size} px, {len(paths)} images"
    save_heatmaps(maps, args.output, title=title)
    with atomic_open(os.path.join(args.output, 'erf.csv'), 'w') as f:
        w = csv.writer(f)
        w.writerow(['stage', 'height', 'width', 'images'] + [f'area_{int(t * 100)}' for t in AREA_THRESHOLDS])
        for s, v in sums.items():
            ratios = [area_ratio(v, t) for t in AREA_THRESHOLDS]
            w.writerow([s, v.shape[0], v.shape[1], len(paths)] + [f'{100 * r:.2f}' for r in ratios])
            print(f"stage {s}: " + ', '.join(f"{int(t * 100)}% of the gradient in {100 * r:.1f}% of the area"
                                             for t, r in zip(AREA_THRESHOLDS, ratios)))
    print(f"erf: wrote {len(maps)} maps to {args.output}")
    return 0
