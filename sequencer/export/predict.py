"""Top-k predictions for image files, with class names.

Images are decoded as in training and validation (``sequencer.data.images``: EXIF orientation, 16-bit,
palette and CMYK files). Names come from ``--class-map``, else from the run the checkpoint belongs to (its
``class_names``, a class map named in its args, or class_names.txt / class_map.txt beside it), else
ImageNet-1K's (timm ships them) for a 1000-way head, else 'class <i>'. Images are read, transformed with the
model's evaluation transform and classified in batches.
"""
import argparse
import json
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..data.images import IMAGE_MODES, load_image
from ..engine.args import COUNT
from ..engine.loading import add_model_arguments, class_names, list_images, model_from_args, resolve_device
from ..errors import UserError
from ..fast import gemm

__all__ = ['predict']


@torch.no_grad()
def predict(model: nn.Module, paths: Sequence[str], names: Sequence[str], topk: int = 5, batch_size: int = 32,
            img_size: Optional[int] = None, device: torch.device = torch.device('cpu'), cfg: Optional[Dict] = None,
            log=None) -> List[Dict]:
    """One dict per image: {'image': path, 'topk': [{'index', 'label', 'prob'}, ...]} (probabilities 0-1).

    ``cfg``: the data config (default: the model's evaluation transform at ``img_size``).
    """
    import timm.data

    from ..data import data_config

    model.eval()
    transform = timm.data.create_transform(**(cfg or data_config(model, img_size=img_size)), is_training=False)
    k = min(topk, len(names))
    mode = IMAGE_MODES.get(getattr(model, 'in_chans', 3), 'RGB')
    if k < 1:
        raise UserError(f"--topk must be at least 1, got {topk}")
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        x = torch.stack([transform(load_image(p, mode)) for p in chunk]).to(device)
        probs = model(x).float().softmax(dim=-1).cpu()
        top = probs.topk(k, dim=-1)
        for path, values, indices in zip(chunk, top.values.tolist(), top.indices.tolist()):
            results.append(dict(image=path, topk=[dict(index=i, label=names[i], prob=round(p, 6))
                                                  for p, i in zip(values, indices)]))
        if log is not None and len(paths) > batch_size:
            log(f"predict: {min(start + batch_size, len(paths))}/{len(paths)} images")
    return results


def add_arguments(parser: argparse.ArgumentParser):
    parser.description = (
        "Classify images: print the top-k classes of each image with their probabilities. Class names are "
        "ImageNet-1K's for a 1000-class model, or the run's (from the checkpoint or a class map beside it), "
        "or those of --class-map. --json prints a JSON list with one entry per image instead.")
    parser.add_argument('images', nargs='+', metavar='IMAGE_OR_DIR',
                        help='image files or folders (searched recursively)')
    add_model_arguments(parser)
    parser.add_argument('--topk', '-k', type=COUNT, default=5, help='classes per image (default: %(default)s)')
    parser.add_argument('--class-map', default=None, metavar='FILE',
                        help='class names, one per line in output-index order (timm class-map format)')
    parser.add_argument('--img-size', type=COUNT, default=None,
                        help="input resolution (default: the run's training resolution, else the model's)")
    parser.add_argument('-b', '--batch-size', type=COUNT, default=32, help='batch size (default: %(default)s)')
    parser.add_argument('--json', action='store_true', help='print a JSON list, one entry per image')


def run(args) -> int:
    import sys
    paths = list_images(args.images)
    device = resolve_device(args.device)

    def log(msg):
        print(msg, file=sys.stderr)

    loaded = model_from_args(args, device=device, log=log)
    names = class_names(loaded, args.class_map)
    with gemm.packing_on():   # inference on weights loaded once: oneDNN's GEMMs may keep them packed
        results = predict(loaded.model, paths, names, topk=args.topk, batch_size=args.batch_size, device=device,
                          cfg=loaded.data_config(img_size=args.img_size), log=log)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(r['image'])
        for rank, t in enumerate(r['topk'], 1):
            print(f"  {rank}. {t['label']} ({t['index']}): {100 * t['prob']:.2f}%")
    return 0
