"""What the inference-side commands (erf, resolution, robustness, predict, export) share: building a model
with its weights from command-line arguments, finding and reading images, and naming classes.

Weights come from ``--checkpoint`` (any layout ``sequencer.load_checkpoint`` reads) or ``--pretrained``
(the published ImageNet-1K weights). With a training checkpoint, ``--model`` may be left out (the
checkpoint's ``arch`` is used) and the head width is taken from the checkpoint, so a fine-tuned model
needs no ``--num-classes``.
"""
import argparse
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..data.datasets import class_map_lines
from ..data.images import load_image
from ..errors import UserError, first_line
from ..factory import create_model
from ..models.weights import CheckpointError, convert_state_dict, load_state_dict, read_file, resolve_path, unwrap
from .args import COUNT, NATURAL, ParseKwargs

__all__ = ['add_model_arguments', 'build_model', 'model_from_args', 'resolve_device', 'list_images', 'load_image',
           'class_names', 'LoadedModel']


def add_model_arguments(parser: argparse.ArgumentParser, multiple: bool = False, device: bool = True):
    """``--model``, ``--checkpoint``, ``--pretrained``, ``--use-ema``, ``--num-classes``, ``--model-kwargs``
    (and ``--device``). With ``multiple``, ``--model`` and ``--checkpoint`` take several values."""
    g = parser.add_argument_group('Model and weights')
    if multiple:
        g.add_argument('--model', nargs='+', default=[], metavar='NAME',
                       help='model name(s) (see `sequencer models`); one name with several checkpoints compares '
                            'the checkpoints, several names pair with the checkpoints in order')
        g.add_argument('--checkpoint', nargs='+', default=[], metavar='PATH',
                       help="weights for each model (any supported layout; 'none' for a model's published "
                            "weights with --pretrained, or its initial weights without)")
        g.add_argument('--labels', nargs='+', default=[], metavar='LABEL',
                       help='legend labels, one per model/checkpoint (default: the model name and checkpoint file)')
    else:
        g.add_argument('--model', '-m', default=None, metavar='NAME',
                       help="model name (see `sequencer models`; default: the checkpoint's 'arch')")
        g.add_argument('--checkpoint', default=None, metavar='PATH',
                       help='weights to load: a file in any supported layout, URL or hf-hub: id')
    g.add_argument('--pretrained', action='store_true',
                   help='load the published ImageNet-1K weights (where no checkpoint is given)')
    g.add_argument('--use-ema', action='store_true', help="use a training checkpoint's EMA weights")
    g.add_argument('--num-classes', type=COUNT, default=None,
                   help='classifier width (default: from the checkpoint, else 1000)')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                   help="constructor arguments of a custom configuration, e.g. layers='(1,1,1,1)' "
                        "(default: those recorded in the training checkpoint's args)")
    if device:
        g.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    return g


def add_evaluation_arguments(parser: argparse.ArgumentParser, progress_on: str = '') -> None:
    """The evaluation tools' (``resolution``, ``robustness``) ``-b``, ``-j``, ``--amp-dtype``, ``--log-interval``
    (progress lines ``progress_on`` what, e.g. ' on A / R') and ``--output``."""
    parser.add_argument('-b', '--batch-size', type=COUNT, default=64, help='batch size (default: %(default)s)')
    parser.add_argument('-j', '--workers', type=NATURAL, default=2,
                        help='data loading processes (default: %(default)s)')
    parser.add_argument('--amp-dtype', default=None, choices=['float16', 'bfloat16'],
                        help='evaluate under autocast with this dtype (default: float32)')
    parser.add_argument('--log-interval', type=NATURAL, default=50,
                        help=f'batches between progress lines{progress_on}, 0 for none (default: %(default)s)')
    parser.add_argument('--output', '-o', required=True, metavar='DIR', help='output folder')


def resolve_device(name: Optional[str] = None, mps: bool = True) -> torch.device:
    """The ``--device`` to run on: cpu or cuda[:N] (default: cuda when available), mps where ``mps`` and the
    machine has it; anything else, or cuda on a machine without it, is a ``UserError`` naming the flag."""
    if not name:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is not None and device.type == 'mps' and mps and torch.backends.mps.is_available():
        return device
    if device is None or device.type not in ('cpu', 'cuda'):
        raise UserError(f"--device {name}: not a device this command runs on (use cpu or cuda)")
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


class LoadedModel:
    """A model in eval mode and what is known about its weights (``meta``: the training checkpoint's
    ``arch``, ``epoch``, ``args``, ``class_names`` where present)."""

    def __init__(self, model: nn.Module, name: str, checkpoint: Optional[str], meta: Dict, pretrained: bool = False):
        self.model, self.name, self.checkpoint, self.meta = model, name, checkpoint, meta
        self.pretrained = pretrained and not checkpoint

    @property
    def img_size(self) -> int:
        """The run's training resolution where the checkpoint records it, else the model's default."""
        args = _args_of(self.meta)
        size = args.get('img_size') or (args.get('input_size') or [None])[-1]
        return (int(size) if isinstance(size, (int, float)) and size
                else int(self.model.pretrained_cfg['input_size'][-1]))

    def data_config(self, img_size: Optional[int] = None, crop_pct: Optional[float] = None,
                    flag: str = '--img-size') -> Dict:
        """The evaluation transform: explicit arguments first, then the run's (mean, std, crop_pct,
        interpolation, resolution recorded in a training checkpoint), then the model's defaults."""
        from ..data import data_config
        args = _args_of(self.meta)
        run = {k: args.get(k) for k in ('mean', 'std', 'crop_pct', 'interpolation') if args.get(k)}
        if crop_pct is not None:
            run['crop_pct'] = crop_pct
        return data_config(self.model, img_size=img_size or self.img_size, flag=flag, **run)

    @property
    def label(self) -> str:
        if not self.checkpoint:
            return f"{self.name} ({'published' if self.pretrained else 'initial'} weights)"
        name = self.meta.get('model_name') or self.name   # a run's own name for its model (the demo's)
        return f"{name} ({os.path.basename(self.checkpoint.rstrip('/'))})"


def _head_width(sd: Dict[str, torch.Tensor]) -> Optional[int]:
    w = convert_state_dict(sd).get('head.fc.weight')
    if w is not None:
        return int(w.shape[0])
    return 0 if not any(k.startswith('head.') for k in convert_state_dict(sd)) else None


def _in_chans(sd: Dict[str, torch.Tensor]) -> Optional[int]:
    """The input channels of a Sequencer state dict: those of its stem's patch embedding."""
    w = convert_state_dict(sd).get('stem.proj.weight')
    return int(w.shape[1]) if w is not None and w.dim() == 4 else None


def read_checkpoint(path: str, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """The state dict of a weight file and the metadata of a training checkpoint (empty for plain weights)."""
    local = resolve_path(path)
    obj = read_file(local)
    if use_ema and not (isinstance(obj, dict) and any(isinstance(obj.get(k), dict) and obj[k]
                                                       for k in ('state_dict_ema', 'model_ema'))):
        raise CheckpointError(f"{path}: --use-ema given but the file holds no EMA weights")
    try:
        sd = unwrap(obj, use_ema=use_ema)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    keys = ('arch', 'epoch', 'args', 'metric', 'class_names', 'model_kwargs', 'num_classes', 'model_name',
            'model_label')
    meta = {k: obj[k] for k in keys if isinstance(obj, dict) and obj.get(k) is not None}
    return sd, meta


def _args_of(meta: Dict) -> Dict:
    args = meta.get('args')
    return args if isinstance(args, dict) else {}


def create_model_checked(name: str, kwargs: Dict, what: str = '', **options) -> nn.Module:
    """``create_model(name, **options, **kwargs)`` where ``kwargs`` come from the user (``--model-kwargs``): the
    model's own rejection of them (TypeError, ValueError, ...) becomes one ``UserError`` naming them and ``what``
    (other options the user gave)."""
    try:
        return create_model(name, **options, **kwargs)
    except UserError:
        raise
    except (TypeError, ValueError, ZeroDivisionError, AssertionError) as e:   # (timm asserts, e.g. a pool type)
        raise UserError(f"{name}: bad model arguments {kwargs}{what} ({first_line(e)})") from None


def build_model(name: Optional[str] = None, checkpoint: Optional[str] = None, pretrained: bool = False,
                num_classes: Optional[int] = None, use_ema: bool = False, model_kwargs: Optional[Dict] = None,
                device: torch.device = torch.device('cpu'), log=print) -> LoadedModel:
    """A model in eval mode with its weights; every user mistake raises ``UserError`` with one line."""
    if checkpoint and checkpoint.lower() == 'none':
        checkpoint = None
    sd, meta = read_checkpoint(checkpoint, use_ema=use_ema) if checkpoint else (None, {})
    run_args = _args_of(meta)
    name = name or meta.get('arch') or run_args.get('model')
    if not name and not checkpoint:
        raise UserError("give --model NAME or --checkpoint FILE")
    if not name:
        raise UserError(f"{checkpoint}: --model is required (the checkpoint does not say which architecture it "
                        f"holds)")
    recorded = meta.get('model_kwargs', run_args.get('model_kwargs'))
    kwargs = dict(recorded) if isinstance(recorded, dict) else {}
    kwargs.update(model_kwargs or {})
    if num_classes is None and sd is not None:
        num_classes = _head_width(sd)
    if 'in_chans' not in kwargs and sd is not None and _in_chans(sd) not in (None, 3):
        kwargs['in_chans'] = _in_chans(sd)   # a grayscale run's weights
    if 'global_pool' not in kwargs and run_args.get('gp'):
        kwargs['global_pool'] = run_args['gp']   # the pooling the run trained with
    model = create_model_checked(name, kwargs, pretrained=pretrained and sd is None, num_classes=num_classes)
    if sd is not None:
        load_state_dict(model, sd, source=checkpoint)
    elif not pretrained and log is not None:
        log(f"note: {name} has neither --checkpoint nor --pretrained: using its randomly initialised weights")
    return LoadedModel(model.to(device).eval(), name, checkpoint, meta, pretrained=pretrained)


def model_from_args(args: argparse.Namespace, device: Optional[torch.device] = None, log=print) -> LoadedModel:
    return build_model(args.model, args.checkpoint, pretrained=args.pretrained, num_classes=args.num_classes,
                       use_ema=args.use_ema, model_kwargs=args.model_kwargs,
                       device=device or resolve_device(getattr(args, 'device', None)), log=log)


def models_from_args(args: argparse.Namespace, device: torch.device, log=print) -> List[Tuple[str, LoadedModel]]:
    """(label, model) pairs for ``add_model_arguments(multiple=True)``: one model with several checkpoints,
    or several models each with its own checkpoint (or none)."""
    names, ckpts = list(args.model), list(args.checkpoint)
    if not names and not ckpts:
        raise UserError("give at least one --model (or --checkpoint)")
    if len(names) <= 1 and len(ckpts) > 1:
        names = names * len(ckpts) if names else [None] * len(ckpts)
    elif not ckpts:
        ckpts = [None] * len(names)
    elif not names:
        names = [None] * len(ckpts)
    if len(names) != len(ckpts):
        raise UserError(f"{len(names)} models but {len(ckpts)} checkpoints: give one checkpoint per model "
                        f"(or 'none'), or one model with several checkpoints")
    out = []
    for name, ckpt in zip(names, ckpts):
        lm = build_model(name, ckpt, pretrained=args.pretrained, num_classes=args.num_classes, use_ema=args.use_ema,
                         model_kwargs=args.model_kwargs, device=device, log=log)
        out.append(lm)
    labels = list(args.labels) if args.labels else [lm.label for lm in out]
    if len(labels) != len(out):
        raise UserError(f"{len(labels)} labels for {len(out)} models")
    if len(set(labels)) != len(labels):
        raise UserError(f"labels must differ: {', '.join(labels)} (use --labels)")
    return list(zip(labels, out))


# ---- images ---------------------------------------------------------------------------------------------
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.ppm')


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r'(\d+)', s)]


def list_images(paths: Sequence[str]) -> List[str]:
    """Image files named in ``paths``, folders searched recursively (sorted naturally, hidden files skipped)."""
    found = []
    for path in paths:
        if os.path.isfile(path):
            found.append(path)
        elif os.path.isdir(path):
            inner = []
            for root, dirs, files in os.walk(path, followlinks=True):
                dirs[:] = [d for d in dirs if not d.startswith('.')]
                inner += [os.path.join(root, f) for f in files
                          if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith('.')]
            if not inner:
                raise UserError(f"{path}: no images ({', '.join(IMG_EXTENSIONS)}) in this folder")
            found += sorted(inner, key=_natural_key)
        else:
            raise UserError(f"{path}: no such file or directory")
    if not found:
        raise UserError("no images given")
    return found


# ---- class names ----------------------------------------------------------------------------------------
def read_class_map(path: str) -> List[str]:
    """Class names from a timm class-map file: one name per line, the line number being the index
    (``name index`` pairs are also read)."""
    lines = class_map_lines(path)
    pairs = [line.rsplit(None, 1) for line in lines]
    if lines and all(len(p) == 2 and p[1].isdigit() for p in pairs):
        names = [''] * (max(int(p[1]) for p in pairs) + 1)
        for name, idx in pairs:
            names[int(idx)] = name
        return names
    return lines


def _run_class_names(loaded: LoadedModel) -> Optional[List[str]]:
    names = loaded.meta.get('class_names') or _args_of(loaded.meta).get('class_names')
    if isinstance(names, (list, tuple)) and names:
        return [str(n) for n in names]
    candidates = []
    class_map = _args_of(loaded.meta).get('class_map')
    if isinstance(class_map, str) and class_map:
        candidates.append(class_map)
    if loaded.checkpoint and os.path.isfile(loaded.checkpoint):
        run_dir = os.path.dirname(os.path.abspath(loaded.checkpoint))
        candidates += [os.path.join(run_dir, f) for f in ('class_names.txt', 'class_map.txt', 'classes.txt')]
    for path in candidates:
        if os.path.isfile(path):
            return read_class_map(path)
    return None


def class_names(loaded: LoadedModel, class_map: Optional[str] = None) -> List[str]:
    """Names of the model's outputs: ``class_map`` if given, else the run's (checkpoint ``class_names``,
    a class map named in its args, or class_names.txt / class_map.txt beside it), else ImageNet-1K's
    names for a 1000-way head, else 'class <i>'."""
    n = getattr(loaded.model, 'num_classes', 0)
    names = read_class_map(class_map) if class_map else _run_class_names(loaded)
    if names is not None:
        if len(names) != n:
            source = class_map or 'the run'
            raise UserError(f"{source}: {len(names)} class names for a model with {n} outputs")
        return names
    if n == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return [info.index_to_description(i).split(',')[0] for i in range(1000)]
    return [f'class {i}' for i in range(n)]
