"""Resolution adaptability (the paper's test-resolution study): one set of weights evaluated at several input
resolutions without retraining. Sequencer2D has no position embedding and its LSTMs run over however many
tokens there are, so any resolution is a valid input; the vanilla Sequencer's position embedding (if any)
is resampled.

Each resolution uses the evaluation transform (resize to size / crop_pct, centre crop to size) with only the
size changed; a training checkpoint's recorded mean, std, crop_pct and interpolation are kept.
"""
import argparse
import csv
import io
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..data.datasets import build_dataset
from ..data.loaders import check_input_size
from ..engine.args import COUNT, POSITIVE
from ..engine.io import atomic_open, check_output, write_text, write_with
from ..engine.loading import add_evaluation_arguments, add_model_arguments, models_from_args, resolve_device

__all__ = ['sweep', 'plot_sweep', 'FIELDS']

FIELDS = ('label', 'model', 'checkpoint', 'img_size', 'top1', 'top5', 'loss', 'count')


def check_classes(model: nn.Module, dataset, weights: Optional[str], data_dir: str) -> None:
    """The model has an output for every class of ``dataset`` (see ``evaluate.check_num_classes``)."""
    from ..engine.evaluate import check_num_classes
    name = weights or getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    check_num_classes(getattr(model, 'num_classes', None), dataset, name, data_dir)


def sweep(model: nn.Module, data_dir: str, sizes: Sequence[int], split: str = 'validation', batch_size: int = 64,
          workers: int = 2, device: torch.device = torch.device('cpu'), crop_pct: Optional[float] = None,
          amp_dtype: Optional[torch.dtype] = None, config: Optional[Callable[[int], Dict]] = None,
          log=print, log_every: int = 0, dataset=None, bad_samples: str = 'fail', weights: Optional[str] = None) \
        -> List[Dict]:
    """top-1 / top-5 / loss of ``model`` on ``data_dir`` at each of ``sizes`` (one dict per size).

    ``config(size)`` gives the data config at a size (default: the model's evaluation transform at that size).
    ``dataset`` (from ``build_dataset``) saves finding the images again; ``weights`` names the model in messages.
    Data with more classes than the model has outputs is refused before any image is read; an unreadable image
    stops the sweep with one line naming the file, as in validate (``bad_samples='skip'`` skips and counts it).
    """
    from ..data import create_eval_loader, data_config
    from ..engine.evaluate import evaluate

    dataset = dataset if dataset is not None else build_dataset('', data_dir, split, False)
    check_classes(model, dataset, weights, data_dir)
    results = []
    for size in sizes:
        cfg = (config(size) if config is not None
               else data_config(model, img_size=size, crop_pct=crop_pct, flag='--sizes'))
        loader = create_eval_loader(dataset, cfg, batch_size=batch_size, workers=workers, device=device,
                                    bad_samples=bad_samples)
        r = evaluate(model, loader, device=device, amp_dtype=amp_dtype, log_every=log_every if log else 0,
                     log=lambda msg: log(f'  {size:4d} px: {msg}'))
        results.append(dict(img_size=size, **r))
        if log is not None:
            log(f"  {size:4d} px: top-1 {r['top1']:6.2f}  top-5 {r['top5']:6.2f}  loss {r['loss']:.4f}  "
                f"({r['count']} images)")
    return results


def plot_sweep(rows: Sequence[Dict], path: str, native: Optional[Dict[str, int]] = None, title: str = ''):
    """top-1 against resolution, one line per label; a dotted vertical line marks each model's native size."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = list(dict.fromkeys(r['label'] for r in rows))
    for label in labels:
        pts = sorted((r['img_size'], r['top1']) for r in rows if r['label'] == label)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', label=label)
        if native and label in native:
            ax.axvline(native[label], color=line.get_color(), linestyle=':', linewidth=1)
    ax.set_xlabel('test resolution (px)')
    ax.set_ylabel('top-1 accuracy (%)')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=120, bbox_inches='tight')
    plt.close(fig)
    write_with(path, lambda f: f.write(buf.getvalue()))


def write_csv(rows: Sequence[Dict], path: str):
    with atomic_open(path, 'w') as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction='ignore')
        w.writeheader()
        for r in rows:
            w.writerow({k: (f'{r[k]:.4f}' if isinstance(r[k], float) else r[k]) for k in FIELDS})


def markdown(rows: Sequence[Dict]) -> str:
    """A table: one row per label, one column per resolution (top-1)."""
    sizes = sorted({r['img_size'] for r in rows})
    labels = list(dict.fromkeys(r['label'] for r in rows))
    top1 = {(r['label'], r['img_size']): r['top1'] for r in rows}
    lines = ['| model | ' + ' | '.join(f'{s} px' for s in sizes) + ' |', '|---|' + '---|' * len(sizes)]
    for label in labels:
        cells = [f"{top1[(label, s)]:.2f}" if (label, s) in top1 else '' for s in sizes]
        lines.append(f"| {label} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


# ---- command --------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser):
    parser.description = (
        "Resolution adaptability: evaluate the same weights at several test resolutions, without retraining "
        "(top-1, top-5, loss per size). Several models, or one model with several checkpoints, go on one "
        "plot. Writes resolution.csv (one row per model and size), resolution.md (top-1 table) and "
        "resolution.png (top-1 against resolution; dotted lines mark each model's native size).")
    parser.add_argument('data', metavar='DATA', help='evaluation images in ImageFolder layout (DATA/val/<class>/* '
                        'or DATA/<class>/*)')
    add_model_arguments(parser, multiple=True)
    parser.add_argument('--sizes', type=COUNT, nargs='+', required=True, metavar='PX',
                        help='test resolutions, e.g. 128 160 192 224 256 320 384')
    parser.add_argument('--split', default='validation',
                        help="split folder to use if DATA has several (default: %(default)s, which finds val/)")
    parser.add_argument('--crop-pct', type=POSITIVE, default=None, help="centre-crop fraction (default: the model's)")
    add_evaluation_arguments(parser)


def run(args) -> int:
    sizes = sorted(set(args.sizes))
    check_output(args.output, '--output', folder=True)
    device = resolve_device(args.device)
    amp = getattr(torch, args.amp_dtype) if args.amp_dtype else None
    dataset = build_dataset('', args.data, args.split, False)  # as validate finds it, before any model is built
    models = models_from_args(args, device)
    for label, lm in models:  # every model fits the data and takes every size before the first sweep starts
        check_classes(lm.model, dataset, lm.checkpoint or lm.label, args.data)
        check_input_size(lm.model, (sizes[0], sizes[0]), '--sizes')
    rows, native = [], {}
    for label, lm in models:
        print(f"resolution: {label}")
        native[label] = lm.img_size
        for r in sweep(lm.model, args.data, sizes, split=args.split, batch_size=args.batch_size,
                       workers=args.workers, device=device, amp_dtype=amp, log_every=args.log_interval,
                       config=lambda size, lm=lm: lm.data_config(img_size=size, crop_pct=args.crop_pct, flag='--sizes'),
                       dataset=dataset, weights=lm.checkpoint or lm.label):
            rows.append(dict(label=label, model=lm.name, checkpoint=lm.checkpoint or '', **r))
        lm.model.cpu()
    os.makedirs(args.output, exist_ok=True)
    write_csv(rows, os.path.join(args.output, 'resolution.csv'))
    table = markdown(rows)
    write_text(os.path.join(args.output, 'resolution.md'), table)
    plot_sweep(rows, os.path.join(args.output, 'resolution.png'), native=native,
               title=f"top-1 against test resolution ({os.path.basename(os.path.abspath(args.data))})")
    print(table, end='')
    print(f"resolution: wrote resolution.csv, resolution.md, resolution.png to {args.output}")
    return 0
