"""Robustness benchmarks: ImageNet-C (mCE), ImageNet-A, ImageNet-R, ImageNet-Sketch and ImageNetV2.

ImageNet-C (Hendrycks & Dietterich, 2019): <root>/<corruption>/<severity>/<wnid>/<image>. For each of the 15
corruptions the top-1 error is averaged over severities 1-5 and divided by AlexNet's average error on
that corruption; the mean over corruptions, in percent, is the mCE (lower is better). The unnormalised
mean error is reported too. As in the paper's reference code, the corrupted 224 px images are fed
without a centre crop (crop_pct 1.0).

ImageNet-A / ImageNet-R hold 200 of the 1000 classes in <root>/<wnid>/<image> folders: the 1000-way
logits are restricted to those 200 before the arg-max. The folders' wnids are mapped to ImageNet-1K
indices with timm's ImageNetInfo (no download). ImageNet-Sketch (wnid folders) and ImageNetV2 (folders
named by class index, 0..999) are read the same way; any folder set that is a subset of the 1000 classes
is evaluated restricted to it.
"""
import argparse
import csv
import functools
import json
import os
from typing import Dict, List, Sequence

import torch
from torch import nn

from ..engine.args import COUNT, POSITIVE
from ..engine.io import atomic_open, check_output, write_text
from ..engine.loading import add_evaluation_arguments, add_model_arguments, model_from_args, resolve_device
from ..errors import UserError

__all__ = ['ALEXNET_ERRORS', 'CORRUPTIONS', 'imagenet_class_index', 'corruption_errors', 'mce', 'evaluate_folder',
           'evaluate_imagenet_c']

# AlexNet's top-1 error on ImageNet-C, averaged over severities 1-5 (Hendrycks & Dietterich, ICLR 2019):
# the normaliser of the corruption error. The 15 corruptions of the benchmark, in its usual order.
ALEXNET_ERRORS: Dict[str, float] = {
    'gaussian_noise': 0.886428, 'shot_noise': 0.894468, 'impulse_noise': 0.922640,
    'defocus_blur': 0.819880, 'glass_blur': 0.826268, 'motion_blur': 0.785948, 'zoom_blur': 0.798360,
    'snow': 0.866816, 'frost': 0.826572, 'fog': 0.819324, 'brightness': 0.564592,
    'contrast': 0.853204, 'elastic_transform': 0.646056, 'pixelate': 0.717840, 'jpeg_compression': 0.606500,
}
CORRUPTIONS = tuple(ALEXNET_ERRORS)
SEVERITIES = (1, 2, 3, 4, 5)

# the other benchmarks: option name, display name
FOLDER_BENCHMARKS = (('imagenet_a', 'ImageNet-A'), ('imagenet_r', 'ImageNet-R'),
                     ('imagenet_sketch', 'ImageNet-Sketch'), ('imagenetv2', 'ImageNetV2'))


@functools.lru_cache(maxsize=1)
def _wnid_index() -> Dict[str, int]:
    from timm.data import ImageNetInfo
    return {w: i for i, w in enumerate(ImageNetInfo().label_names())}


def imagenet_class_index(folder_names: Sequence[str]) -> torch.Tensor:
    """ImageNet-1K output index of each class folder: a wnid ('n01440764') or a class index ('0'..'999')."""
    wnids = _wnid_index()
    out = []
    for name in folder_names:
        if name in wnids:
            out.append(wnids[name])
        elif name.isdigit() and int(name) < 1000:
            out.append(int(name))
        else:
            raise UserError(f"class folder {name!r} is neither an ImageNet-1K wnid nor a class index 0..999")
    if len(set(out)) != len(out):
        raise UserError("two class folders name the same ImageNet-1K class")
    return torch.tensor(out, dtype=torch.long)


def corruption_errors(errors: Dict[str, Sequence[float]],
                      alexnet: Dict[str, float] = ALEXNET_ERRORS) -> Dict[str, Dict]:
    """Per corruption: its top-1 errors by severity (fractions), their mean and the corruption error
    CE = mean error / AlexNet's mean error."""
    out = {}
    for name, errs in errors.items():
        if name not in alexnet:
            raise UserError(f"{name}: not an ImageNet-C corruption with a published AlexNet error "
                            f"({', '.join(alexnet)})")
        mean = sum(errs) / len(errs)
        out[name] = dict(errors=list(errs), error=mean, alexnet=alexnet[name], ce=mean / alexnet[name])
    return out


def mce(ces: Dict[str, Dict]) -> Dict[str, float]:
    """mCE (%) = 100 x mean over corruptions of CE; also the unnormalised mean error (%)."""
    if not ces:
        raise UserError("no corruptions to average")
    n = len(ces)
    return dict(mce=100 * sum(c['ce'] for c in ces.values()) / n,
                mean_error=100 * sum(c['error'] for c in ces.values()) / n, num_corruptions=n)


def _loader(path: str, cfg: Dict, batch_size: int, workers: int, device: torch.device):
    from ..data import create_eval_dataset, create_eval_loader
    ds = create_eval_dataset(path, split='validation')
    reader = getattr(ds, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None)
    if not class_to_idx:
        raise UserError(f"{path}: expected one folder per class")
    folders = [name for name, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
    index = imagenet_class_index(folders)
    loader = create_eval_loader(ds, cfg, batch_size=batch_size, workers=workers, device=device)
    return loader, index, len(ds)


def evaluate_folder(model: nn.Module, path: str, cfg: Dict, batch_size: int = 64, workers: int = 2,
                    device: torch.device = torch.device('cpu'), amp_dtype=None, log_every: int = 0,
                    log=print) -> Dict[str, float]:
    """top-1 / top-5 on an ImageNet-class folder, the 1000-way logits restricted to the classes it holds."""
    from ..engine.evaluate import evaluate
    if getattr(model, 'num_classes', 1000) != 1000:
        raise UserError(f"robustness benchmarks need a 1000-class ImageNet model, this one has "
                        f"{model.num_classes} outputs")
    loader, index, n = _loader(path, cfg, batch_size, workers, device)
    restrict = None if torch.equal(index, torch.arange(1000)) else index
    r = evaluate(model, loader, device=device, amp_dtype=amp_dtype, class_index=restrict, log_every=log_every,
                 log=lambda msg: log(f'  {msg}'))
    r['classes'] = len(index)
    return r


def evaluate_imagenet_c(model: nn.Module, root: str, cfg: Dict, corruptions: Sequence[str] = CORRUPTIONS,
                        severities: Sequence[int] = SEVERITIES, batch_size: int = 64, workers: int = 2,
                        device: torch.device = torch.device('cpu'), amp_dtype=None, allow_partial: bool = False,
                        log=print) -> Dict:
    """Top-1 errors per corruption and severity, CEs and mCE. Missing corruptions / severities raise
    ``UserError`` unless ``allow_partial`` (then only those found are averaged, and the result says so)."""
    if not os.path.isdir(root):
        raise UserError(f"{root}: ImageNet-C folder does not exist")
    missing = [f"{name}/{sev}" for name in corruptions for sev in severities
               if not os.path.isdir(os.path.join(root, name, str(sev)))]
    if missing and not allow_partial:
        raise UserError(f"{root}: missing {len(missing)} corruption/severity folder(s) ({', '.join(missing[:4])}"
                        f"{' ...' if len(missing) > 4 else ''}); --allow-partial averages those present")
    errors, found = {}, {}
    for name in corruptions:
        errs, sevs = [], []
        for sev in severities:
            path = os.path.join(root, name, str(sev))
            if not os.path.isdir(path):
                continue
            r = evaluate_folder(model, path, cfg, batch_size, workers, device, amp_dtype)
            errs.append(1 - r['top1'] / 100)
            sevs.append(sev)
            if log is not None:
                log(f"  {name:18s} severity {sev}: error {100 * errs[-1]:6.2f}% ({r['count']} images)")
        if errs:
            errors[name], found[name] = errs, sevs
    if not errors:
        raise UserError(f"{root}: none of the ImageNet-C corruption folders ({', '.join(corruptions[:3])}, ...) "
                        f"found")
    ces = corruption_errors(errors)
    for name in ces:
        ces[name]['severities'] = found[name]
    complete = not missing and set(ces) == set(CORRUPTIONS) and all(len(c['errors']) == 5 for c in ces.values())
    return dict(corruptions=ces, **mce(ces), complete=complete)


# ---- tables ---------------------------------------------------------------------------------------------
def summary_rows(results: Dict) -> List[Dict]:
    """One row per benchmark: benchmark, metric, value (%), images/classes where known."""
    rows = []
    c = results.get('imagenet_c')
    if c:
        note = '' if c['complete'] else (f"partial: {c['num_corruptions']} of the 15 corruptions, not comparable to "
                                         f"a full mCE")
        rows.append(dict(benchmark='ImageNet-C', metric='mCE (lower is better)', value=c['mce'], note=note))
        rows.append(dict(benchmark='ImageNet-C', metric='mean top-1 error, unnormalised', value=c['mean_error'],
                         note=note))
    for key, display in FOLDER_BENCHMARKS:
        r = results.get(key)
        if r:
            rows.append(dict(benchmark=display, metric='top-1', value=r['top1'],
                             note=f"{r['count']} images, {r['classes']} classes"))
            rows.append(dict(benchmark=display, metric='top-5', value=r['top5'], note=''))
    return rows


def markdown(rows: Sequence[Dict], title: str = '') -> str:
    lines = ([f"**{title}**", ''] if title else []) + ['| benchmark | metric | value (%) | note |', '|---|---|---|---|']
    lines += [f"| {r['benchmark']} | {r['metric']} | {r['value']:.2f} | {r['note']} |" for r in rows]
    return '\n'.join(lines) + '\n'


def corruption_markdown(ces: Dict[str, Dict]) -> str:
    lines = ['| corruption | error by severity (%) | mean error (%) | AlexNet error (%) | CE (%) |',
             '|---|---|---|---|---|']
    for name, c in ces.items():
        errs = ' / '.join(f"{100 * e:.1f}" for e in c['errors'])
        lines.append(f"| {name} | {errs} | {100 * c['error']:.2f} | {100 * c['alexnet']:.2f} | {100 * c['ce']:.2f} |")
    return '\n'.join(lines) + '\n'


# ---- command --------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser):
    parser.description = (
        "Robustness of a 1000-class ImageNet model. ImageNet-C: top-1 error for each of the 15 corruptions x 5 "
        "severities (<root>/<corruption>/<severity>/<wnid>/*), each corruption's mean error divided by "
        "AlexNet's (the published table), mCE = their mean. ImageNet-A / -R (200 wnid folders): top-1 with "
        "the 1000-way logits restricted to those classes. ImageNet-Sketch (wnid folders) and ImageNetV2 "
        "(folders 0..999): top-1. Writes robustness.csv and robustness.md (one summary table), "
        "imagenet_c.csv (per corruption and severity) and robustness.json (everything).")
    add_model_arguments(parser)
    g = parser.add_argument_group('Benchmarks (give at least one)')
    g.add_argument('--imagenet-c', metavar='DIR', help='ImageNet-C root (<corruption>/<severity>/<wnid>/*)')
    g.add_argument('--imagenet-a', metavar='DIR', help='ImageNet-A root (<wnid>/*, 200 classes)')
    g.add_argument('--imagenet-r', metavar='DIR', help='ImageNet-R root (<wnid>/*, 200 classes)')
    g.add_argument('--imagenet-sketch', metavar='DIR', help='ImageNet-Sketch root (<wnid>/*)')
    g.add_argument('--imagenetv2', metavar='DIR', help='ImageNetV2 root (<class index>/*)')
    g.add_argument('--corruptions', nargs='+', default=list(CORRUPTIONS), choices=CORRUPTIONS, metavar='NAME',
                   help='ImageNet-C corruptions to evaluate (default: all 15)')
    g.add_argument('--allow-partial', action='store_true',
                   help='average the ImageNet-C folders present instead of failing on missing ones')
    parser.add_argument('--img-size', type=COUNT, default=None,
                        help="input resolution (default: the run's training resolution, else the model's)")
    parser.add_argument('--crop-pct', type=POSITIVE, default=None,
                        help="centre-crop fraction for A / R / Sketch / V2 (default: the model's; ImageNet-C uses 1.0)")
    add_evaluation_arguments(parser, ' on A / R / Sketch / V2')


def run(args) -> int:
    benches = {k: getattr(args, k) for k, _ in FOLDER_BENCHMARKS if getattr(args, k)}
    if not args.imagenet_c and not benches:
        raise UserError("give at least one of --imagenet-c, --imagenet-a, --imagenet-r, --imagenet-sketch, "
                        "--imagenetv2")
    for key, path in list(benches.items()) + ([('imagenet_c', args.imagenet_c)] if args.imagenet_c else []):
        if not os.path.isdir(path):
            raise UserError(f"{path}: {key.replace('_', '-')} folder does not exist")
    check_output(args.output, '--output', folder=True)
    device = resolve_device(args.device)
    amp = getattr(torch, args.amp_dtype) if args.amp_dtype else None
    loaded = model_from_args(args, device=device)
    model = loaded.model
    if model.num_classes != 1000:
        raise UserError(f"robustness benchmarks need a 1000-class ImageNet model; {loaded.label} has "
                        f"{model.num_classes} outputs")
    results = {}
    if args.imagenet_c:
        print(f"robustness: ImageNet-C ({args.imagenet_c})")
        cfg = loaded.data_config(img_size=args.img_size, crop_pct=1.0)
        results['imagenet_c'] = evaluate_imagenet_c(model, args.imagenet_c, cfg, corruptions=args.corruptions,
                                                    batch_size=args.batch_size, workers=args.workers, device=device,
                                                    amp_dtype=amp, allow_partial=args.allow_partial)
        c = results['imagenet_c']
        print(f"  mCE {c['mce']:.2f}%  (unnormalised mean error {c['mean_error']:.2f}%, "
              f"{c['num_corruptions']} corruptions)")
    cfg = loaded.data_config(img_size=args.img_size, crop_pct=args.crop_pct)
    for key, display in FOLDER_BENCHMARKS:
        if key in benches:
            print(f"robustness: {display} ({benches[key]})")
            results[key] = evaluate_folder(model, benches[key], cfg, args.batch_size, args.workers, device, amp,
                                           log_every=args.log_interval)
            print(f"  top-1 {results[key]['top1']:.2f}%  top-5 {results[key]['top5']:.2f}%  "
                  f"({results[key]['count']} images, {results[key]['classes']} classes)")

    os.makedirs(args.output, exist_ok=True)
    rows = summary_rows(results)
    with atomic_open(os.path.join(args.output, 'robustness.csv'), 'w') as f:
        w = csv.DictWriter(f, fieldnames=['model', 'checkpoint', 'benchmark', 'metric', 'value', 'note'])
        w.writeheader()
        for r in rows:
            w.writerow(dict(r, value=f"{r['value']:.4f}", model=loaded.name, checkpoint=loaded.checkpoint or ''))
    table = markdown(rows, title=loaded.label)
    if 'imagenet_c' in results:
        table += '\n' + corruption_markdown(results['imagenet_c']['corruptions'])
        with atomic_open(os.path.join(args.output, 'imagenet_c.csv'), 'w') as f:
            w = csv.writer(f)
            w.writerow(['corruption'] + [f'error_s{s}' for s in SEVERITIES] + ['mean_error', 'alexnet_error', 'ce'])
            for name, c in results['imagenet_c']['corruptions'].items():
                by_sev = dict(zip(c.get('severities', SEVERITIES), c['errors']))
                errs = [f'{by_sev[s]:.6f}' if s in by_sev else '' for s in SEVERITIES]
                w.writerow([name] + errs + [f"{c['error']:.6f}", f"{c['alexnet']:.6f}", f"{c['ce']:.6f}"])
    write_text(os.path.join(args.output, 'robustness.md'), table)
    write_text(os.path.join(args.output, 'robustness.json'),
               json.dumps(dict(model=loaded.name, checkpoint=loaded.checkpoint, results=results), indent=2) + '\n')
    print(table, end='')
    print(f"robustness: wrote robustness.csv, robustness.md, robustness.json to {args.output}")
    return 0
