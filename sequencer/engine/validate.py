"""Validation: top-1 / top-5 / loss of a model on a dataset split, with the paper's evaluation transform.

``sequencer validate DIR --model sequencer2d_s --pretrained`` or ``--checkpoint FILE`` (any layout, a
training checkpoint's EMA weights with ``--use-ema``; ``--pretrained-path FILE`` is the same as
``--checkpoint FILE``); ``--results-file`` writes CSV or JSON.

With none of the weight options the published weights are evaluated, as timm's validate.py does
(``args.pretrained = args.pretrained or not args.checkpoint``), and a note says so before anything is
downloaded; a configuration the published weights cannot fit (``--model-kwargs`` that change the shapes,
a model without published weights) is refused up front, naming ``--checkpoint``.
"""
import csv
import io
import json
import time
from typing import Dict

from timm.data import create_transform, resolve_data_config

from ..data.datasets import (
    Samples,
    ShardSampler,
    build_dataset,
    class_difference,
    class_names_of,
    make_loader,
    num_classes_of,
)
from ..data.images import IMAGE_MODES, image_mode
from ..data.loaders import check_input_size, fit_channels
from ..errors import UserError
from ..fast import gemm
from ..models import get_spec
from ..models.weights import load_state_dict
from .args import build_validate_parser, parse
from .evaluate import check_compile_flags, check_num_classes, evaluate, torch_compile
from .io import check_output, write_text
from .loading import _args_of, _head_width, create_model_checked, read_checkpoint
from .train import Dist, Log, amp_dtype_for

DEFAULT_MODEL = 'sequencer2d_s'
# what a training checkpoint records of its run and validate takes where the command line leaves it unset
RUN_TRANSFORM = ('img_size', 'input_size', 'in_chans', 'mean', 'std', 'crop_pct', 'interpolation')


def main(argv=None) -> int:
    parser = build_validate_parser()
    parser.set_defaults(model=None)   # None: the training checkpoint's architecture, else DEFAULT_MODEL
    args, _ = parse(parser, argv)
    with gemm.packing_on():   # inference on weights loaded once: oneDNN's GEMMs may keep them packed
        validate(args)
    return 0


def _run_settings(args, meta: Dict, log) -> None:
    """Fill what the command line left unset from the training checkpoint's run: the architecture, then the
    resolution and normalisation of its evaluation transform (as predict, export and the analysis commands
    do); say so."""
    run = _args_of(meta)
    if not args.model:
        args.model = meta.get('arch') or run.get('model') or DEFAULT_MODEL
    if run.get('model', args.model) != args.model:
        return   # another architecture than the run's: its transform is not the run's either
    taken = []
    for key in RUN_TRANSFORM:
        if key in ('img_size', 'input_size') and (args.img_size or args.input_size):
            continue
        if key == 'in_chans' and args.input_size:   # its first value is the channels
            continue
        if getattr(args, key, None) in (None, '') and run.get(key) not in (None, ''):
            setattr(args, key, run[key])
            taken.append(f"{key} {run[key]}")
    if taken:
        log(f"note: from the training run of the checkpoint: {', '.join(taken)} (set them to override)")


def _check_class_names(meta: Dict, ds, weights: str, log) -> None:
    """A warning when the data's class folders are not those the checkpoint was trained on."""
    what = class_difference(meta.get('class_names'), class_names_of(ds))
    if what:
        log(f"warning: the data's classes are not those {weights} was trained on ({what}); the figures compare "
            f"each output with another class than it learned")


def _check_published_weights_fit(name: str, kwargs: Dict, implicit: bool) -> None:
    """Before anything is downloaded: the model has published weights, and they fit the configuration
    ``kwargs`` describes (the head aside, which is replaced for another class count). Shapes are compared on
    the meta device: nothing is allocated."""
    import torch

    from ..models import create_model
    spec = get_spec(name)  # an unknown name raises its own one-line error
    if not spec.weights:
        why = "no --checkpoint given, and the model has no published weights to evaluate instead" if implicit \
            else "--pretrained: the model has no published weights"
        raise UserError(f"{name}: {why}; pass --checkpoint FILE")
    try:
        with torch.device('meta'):
            ref = create_model(name).state_dict()
            own = create_model(name, **kwargs).state_dict()
    except Exception:  # bad arguments: left to the real construction, which names them
        return
    skip = ('head.', 'absolute_pos_embed')  # a new head; a position embedding is resampled
    wrong = [k for k in own if not k.startswith(skip) and (k not in ref or ref[k].shape != own[k].shape)]
    wrong += [k for k in ref if not k.startswith(skip) and k not in own]
    if wrong:
        k = wrong[0]
        detail = (f"{k} {tuple(own[k].shape)} vs {tuple(ref[k].shape)}" if k in own and k in ref else k)
        given = ' '.join(f'{a}={v}' for a, v in kwargs.items() if a != 'img_size') or 'the model arguments'
        why = ("no --checkpoint given, and the published weights (evaluated without one, as by timm's validate.py)"
               if implicit else "--pretrained: the published weights")
        raise UserError(f"{name} with {given}: {why} do not fit this configuration ({detail}); pass --checkpoint "
                        f"FILE with its weights")


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
    pretrained_path = getattr(args, 'pretrained_path', None)
    if args.checkpoint and pretrained_path:
        raise UserError(f"--checkpoint {args.checkpoint} and --pretrained-path {pretrained_path}: both name the "
                        f"weights to evaluate; give one")
    weights = args.checkpoint or pretrained_path or ''
    implicit = not weights and not args.pretrained
    amp_dtype = amp_dtype_for(args, d.device, log)
    ds = build_dataset(args.dataset, args.data_dir, args.split, False, args.class_map, args.dataset_download)
    sd, meta = read_checkpoint(weights, use_ema=args.use_ema) if weights else (None, {})
    _run_settings(args, meta, log)
    if weights:
        _check_class_names(meta, ds, weights, log)
    pretrained = not weights  # as timm's validate.py: with no weight file, the published weights
    num_classes = args.num_classes or meta.get('num_classes') or (sd is not None and _head_width(sd)) \
        or (1000 if pretrained else None) or num_classes_of(ds) or 1000
    recorded = meta.get('model_kwargs', _args_of(meta).get('model_kwargs'))
    kwargs = {**(recorded if isinstance(recorded, dict) else {}), **(args.model_kwargs or {})}
    label = meta.get('model_label') or args.model + (
        f" with {', '.join(f'{k}={v}' for k, v in kwargs.items())}" if kwargs else '')
    size = args.input_size[-1] if args.input_size else args.img_size
    if size:
        kwargs['img_size'] = size
    channels = args.in_chans or (args.input_size[0] if args.input_size else None)
    if channels is not None:
        image_mode(channels, f"--in-chans {channels}" if args.in_chans else
                   f"--input-size {' '.join(map(str, args.input_size))}")
        kwargs['in_chans'] = channels
    if args.gp:
        kwargs['global_pool'] = args.gp
    if weights:
        source = weights
    else:
        source = f"{args.model} (published weights" + (f", --num-classes {num_classes})" if args.num_classes else ')')
    check_num_classes(num_classes, ds, source, args.data_dir or args.dataset)  # before any download or image
    if pretrained:
        _check_published_weights_fit(args.model, kwargs, implicit)
    if implicit:
        log(f"note: neither --checkpoint nor --pretrained given: evaluating the published {args.model} weights, "
            f"as timm's validate.py does (--checkpoint FILE evaluates other weights)")
    model = create_model_checked(args.model, kwargs, pretrained=pretrained, num_classes=num_classes,
                                 rnn_engine=args.rnn_engine)
    if sd is not None:
        load_state_dict(model, sd, source=weights)
    channels = channels or 3
    cfg = fit_channels(resolve_data_config(vars(args), model=model), channels)
    check_input_size(model, cfg['input_size'], '--input-size' if args.input_size else '--img-size')
    transform = create_transform(cfg['input_size'], is_training=False, interpolation=cfg['interpolation'],
                                 mean=cfg['mean'], std=cfg['std'], crop_pct=cfg['crop_pct'],
                                 crop_mode=cfg.get('crop_mode'))
    params = sum(p.numel() for p in model.parameters())
    model.to(d.device)
    if args.torchcompile or args.torchcompile_mode:
        model = torch_compile(model, d.device, args.torchcompile, args.torchcompile_mode)
    loader = make_loader(Samples(ds, transform, bad_samples=args.bad_samples, img_mode=IMAGE_MODES[channels]),
                         ShardSampler(len(ds), d.world, d.rank, shuffle=False, drop_last=False),
                         args.batch_size, args.workers, d.device.type == 'cuda')
    log(f"validating {label} ({weights or 'published weights'})"
        f" on {len(ds)} images of {args.data_dir} [{args.split}], input {tuple(cfg['input_size'])}, "
        f"crop {cfg['crop_pct']}, {cfg['interpolation']}")
    start = time.time()
    m = evaluate(model, loader, d.device, amp_dtype, log_every=args.log_interval, log=log)
    result = {'model': args.model, 'checkpoint': weights, 'param_count': round(params / 1e6, 2),
              'top1': round(m['top1'], 4),
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
