"""Validation: top-1 / top-5 / loss of a model on a dataset split, with the paper's evaluation transform.

``sequencer validate DIR --model sequencer2d_s --pretrained`` or ``--checkpoint FILE`` (any layout, a
training checkpoint's EMA weights with ``--use-ema``); ``--results-file`` writes CSV or JSON.
"""
import csv
import io
import json
import os
import time
from typing import Dict

from timm.data import create_transform, resolve_data_config

from ..data.datasets import Samples, ShardSampler, build_dataset, num_classes_of, make_loader
from ..errors import UserError
from ..models import create_model, load_checkpoint
from .args import build_validate_parser, parse
from .evaluate import check_compile_flags, evaluate, torch_compile
from .io import check_output, write_text
from .train import Dist, Log, amp_dtype_for


def main(argv=None) -> int:
    args, _ = parse(build_validate_parser(), argv)
    validate(args)
    return 0


def _checkpoint_meta(path: str) -> Dict:
    """num_classes / model_kwargs recorded in a training checkpoint, if it is one."""
    if not path or not os.path.isfile(path):
        return {}
    from ..models.weights import read_file
    obj = read_file(path)
    return {k: obj[k] for k in ('num_classes', 'model_kwargs', 'arch') if isinstance(obj, dict) and k in obj}


def validate(args) -> Dict:
    d = Dist(args.device)
    log = Log(d.main)
    if not args.data_dir and not args.dataset.startswith('torch/'):
        raise UserError("no dataset given: pass the data folder (DIR) or --data-dir")
    check_compile_flags(args.torchcompile, args.torchcompile_mode)
    if args.batch_size < 1 or args.workers < 0:
        raise UserError(f"--batch-size must be at least 1 and --workers at least 0, got {args.batch_size} and "
                        f"{args.workers}")
    if args.results_file and not args.results_file.endswith(('.csv', '.json')):
        raise UserError(f"--results-file {args.results_file}: use a .csv or .json file name")
    if args.results_file and d.main:
        check_output(args.results_file, '--results-file')
    if not args.checkpoint and not args.pretrained:
        args.pretrained = True  # as timm's validate.py: with no checkpoint, evaluate the published weights
    amp_dtype = amp_dtype_for(args, d.device, log)
    ds = build_dataset(args.dataset, args.data_dir, args.split, False, args.class_map, args.dataset_download)
    meta = _checkpoint_meta(args.checkpoint)
    num_classes = args.num_classes or meta.get('num_classes') or (1000 if args.pretrained else None) \
        or num_classes_of(ds) or 1000
    kwargs = {**meta.get('model_kwargs', {}), **(args.model_kwargs or {})}
    size = args.input_size[-1] if args.input_size else args.img_size
    if size:
        kwargs['img_size'] = size
    model = create_model(args.model, pretrained=args.pretrained, num_classes=num_classes,
                         rnn_engine=args.rnn_engine, **kwargs)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, use_ema=args.use_ema)
    cfg = resolve_data_config(vars(args), model=model)
    if any(float(s) == 0 for s in cfg['std']):  # else every image fails to transform, as if unreadable
        raise UserError(f"--std {' '.join(str(s) for s in cfg['std'])}: the normalisation divides by each value, "
                        f"none may be 0")
    transform = create_transform(cfg['input_size'], is_training=False, interpolation=cfg['interpolation'],
                                 mean=cfg['mean'], std=cfg['std'], crop_pct=cfg['crop_pct'],
                                 crop_mode=cfg.get('crop_mode'))
    model.to(d.device)
    if args.torchcompile or args.torchcompile_mode:
        model = torch_compile(model, d.device, args.torchcompile, args.torchcompile_mode)
    loader = make_loader(Samples(ds, transform, bad_samples=args.bad_samples),
                         ShardSampler(len(ds), d.world, d.rank, shuffle=False, drop_last=False),
                         args.batch_size, args.workers, d.device.type == 'cuda')
    log(f"validating {args.model} ({args.checkpoint or ('published weights' if args.pretrained else 'random init')})"
        f" on {len(ds)} images of {args.data_dir} [{args.split}], input {tuple(cfg['input_size'])}, "
        f"crop {cfg['crop_pct']}, {cfg['interpolation']}")
    start = time.time()
    m = evaluate(model, loader, d.device, amp_dtype, log_every=args.log_interval, log=log)
    result = {'model': args.model, 'checkpoint': args.checkpoint, 'top1': round(m['top1'], 4),
              'top5': round(m['top5'], 4), 'loss': round(m['loss'], 6), 'images': m['count'],
              'img_size': cfg['input_size'][-1], 'crop_pct': cfg['crop_pct'], 'interpolation': cfg['interpolation'],
              'skipped': m['skipped'], 'seconds': round(time.time() - start, 2)}
    log(f"top-1 {result['top1']:.3f}  top-5 {result['top5']:.3f}  loss {result['loss']:.4f}  "
        f"({result['images']} images, {result['seconds']:.1f}s)")
    if args.results_file and d.main:
        write_results(args.results_file, result)
    return result


def write_results(path: str, result: Dict):
    if path.endswith('.json'):
        write_text(path, json.dumps(result, indent=2) + '\n')
    elif path.endswith('.csv'):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(result))
        w.writeheader()
        w.writerow(result)
        write_text(path, buf.getvalue())
    else:
        raise UserError(f"--results-file {path}: use a .csv or .json file name")
