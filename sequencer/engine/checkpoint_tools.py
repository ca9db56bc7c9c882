"""Checkpoint tools: averaging the last / best N checkpoints of a training run, and cleaning a training
checkpoint into a weights-only safetensors file named with its sha256 prefix.

A run folder (timm's convention) holds ``checkpoint-<epoch>.pth.tar`` files (the best ones kept by the
training loop), ``last.pth.tar``, ``model_best.pth.tar`` and ``summary.csv``. Each checkpoint is a dict with
'epoch', 'arch', 'state_dict', optionally 'state_dict_ema' and 'metric' (the eval metric of that epoch).
"""
import csv
import hashlib
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import UserError
from ..models.weights import CheckpointError, convert_state_dict, read_file, unwrap
from .io import write_with

__all__ = ['RunCheckpoint', 'find_checkpoints', 'select_checkpoints', 'average_state_dicts', 'average_checkpoints',
           'clean_checkpoint', 'safetensors_bytes']

_EPOCH_FILE = re.compile(r'^checkpoint-(\d+)\.pth(\.tar)?$')


@dataclass
class RunCheckpoint:
    path: str
    epoch: Optional[int]
    metric: Optional[float]


def _summary_metrics(run_dir: str, column: str = 'eval_top1') -> Dict[int, float]:
    """epoch -> eval metric from the run's summary.csv (empty when absent)."""
    path = os.path.join(run_dir, 'summary.csv')
    out = {}
    if not os.path.isfile(path):
        return out
    with open(path, newline='') as f:
        for row in csv.DictReader(f):
            try:
                out[int(float(row['epoch']))] = float(row[column])
            except (KeyError, TypeError, ValueError):
                continue
    return out


def _read(path: str) -> Dict:
    obj = read_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(obj).__name__}")
    return obj


def find_checkpoints(paths: Sequence[str], metric_column: str = 'eval_top1') -> List[RunCheckpoint]:
    """The checkpoints named by ``paths``: files as given; a run folder contributes its
    ``checkpoint-<epoch>.pth.tar`` files. Epoch and metric come from the file ('epoch', 'metric'), the metric
    falling back to summary.csv."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            names = [n for n in os.listdir(path) if _EPOCH_FILE.match(n)]
            if not names:
                raise UserError(f"{path}: no checkpoint-<epoch>.pth.tar files in this run folder")
            found += [os.path.join(path, n) for n in names]
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise UserError(f"{path}: no such checkpoint file or run folder")
    out, summaries = [], {}
    for p in found:
        obj = _read(p)
        epoch = obj.get('epoch')
        if not isinstance(epoch, int):
            m = _EPOCH_FILE.match(os.path.basename(p))
            epoch = int(m.group(1)) if m else None
        metric = obj.get('metric')
        if not isinstance(metric, (int, float)) or isinstance(metric, bool):
            run = os.path.dirname(os.path.abspath(p))
            if run not in summaries:
                summaries[run] = _summary_metrics(run, metric_column)
            metric = summaries[run].get(epoch) if epoch is not None else None
        out.append(RunCheckpoint(p, epoch, None if metric is None else float(metric)))
    return out


def select_checkpoints(ckpts: Sequence[RunCheckpoint], last: Optional[int] = None, best: Optional[int] = None,
                       lower_is_better: bool = False) -> List[RunCheckpoint]:
    """The ``last`` N by epoch or the ``best`` N by metric (ties: later epoch first); all when neither."""
    if last is not None and best is not None:
        raise UserError("give --last or --best, not both")
    n = last if last is not None else best
    if n is not None and n < 1:
        raise UserError(f"--{'last' if last is not None else 'best'} must be at least 1, got {n}")
    ckpts = list(ckpts)
    if last is not None:
        unknown = [c.path for c in ckpts if c.epoch is None]
        if unknown:
            raise UserError(f"{unknown[0]}: no epoch recorded, cannot order by epoch")
        chosen = sorted(ckpts, key=lambda c: c.epoch, reverse=True)[:last]
    elif best is not None:
        unknown = [c.path for c in ckpts if c.metric is None]
        if unknown:
            raise UserError(f"{unknown[0]}: no 'metric' in the checkpoint nor in summary.csv, cannot rank it")
        sign = 1 if lower_is_better else -1
        chosen = sorted(ckpts, key=lambda c: (sign * c.metric, -(c.epoch or 0)))[:best]
    else:
        chosen = ckpts
    if n is not None and len(chosen) < n:
        print(f"note: only {len(chosen)} checkpoint(s) available, averaging those")
    return sorted(chosen, key=lambda c: (c.epoch is None, c.epoch or 0, c.path))


def average_state_dicts(state_dicts: Sequence[Dict[str, torch.Tensor]],
                        names: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors (accumulated in float64, returned in the original
    dtype); integer tensors (e.g. BatchNorm's ``num_batches_tracked``) are taken from the last state dict.
    All state dicts must have the same keys and shapes."""
    if not state_dicts:
        raise UserError("no checkpoints to average")
    names = list(names) or [f'checkpoint {i}' for i in range(len(state_dicts))]
    ref = state_dicts[0]
    for sd, name in zip(state_dicts[1:], names[1:]):
        if set(sd) != set(ref):
            diff = sorted(set(sd) ^ set(ref))
            raise UserError(f"{name}: its keys differ from {names[0]}'s ({', '.join(diff[:4])})")
        wrong = [k for k in ref if sd[k].shape != ref[k].shape]
        if wrong:
            raise UserError(f"{name}: shapes differ from {names[0]}'s ({', '.join(wrong[:4])})")
    out = {}
    for k, v in ref.items():
        if v.is_floating_point():
            acc = torch.zeros(v.shape, dtype=torch.float64)
            for sd in state_dicts:
                acc += sd[k].double()
            out[k] = (acc / len(state_dicts)).to(v.dtype)
        else:
            out[k] = state_dicts[-1][k].clone()
    return out


def safetensors_bytes(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())}, metadata=metadata)


def _write_weights(sd: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> str:
    """safetensors for .safetensors (default), a plain state dict for .pth / .pt / .bin; returns the sha256."""
    if path.endswith(('.pth', '.pt', '.bin', '.pth.tar')):
        import io as _io
        buf = _io.BytesIO()
        torch.save({k: v.detach().contiguous().cpu() for k, v in sd.items()}, buf)
        data = buf.getvalue()
    else:
        data = safetensors_bytes(sd, metadata)
    write_with(path, lambda f: f.write(data))
    return hashlib.sha256(data).hexdigest()


def average_checkpoints(paths: Sequence[str], output: str, last: Optional[int] = None, best: Optional[int] = None,
                        use_ema: bool = False, lower_is_better: bool = False,
                        log=print) -> Tuple[str, List[RunCheckpoint]]:
    """Average the chosen checkpoints' weights into ``output``; returns (sha256, the checkpoints used)."""
    chosen = select_checkpoints(find_checkpoints(paths), last=last, best=best, lower_is_better=lower_is_better)
    if any(os.path.exists(output) and os.path.samefile(c.path, output) for c in chosen):
        raise UserError(f"--output {output}: is one of the checkpoints being averaged; choose another file")
    sds, arch = [], None
    if log is not None:
        log(f"averaging {len(chosen)} checkpoint(s){' (EMA weights)' if use_ema else ''}:")
    for c in chosen:
        obj = _read(c.path)
        if use_ema and not isinstance(obj.get('state_dict_ema'), dict):
            raise CheckpointError(f"{c.path}: --use-ema given but the checkpoint holds no 'state_dict_ema'")
        sds.append(convert_state_dict(unwrap(obj, use_ema=use_ema)))
        arch = arch or obj.get('arch')
        if log is not None:
            metric = '' if c.metric is None else f", metric {c.metric:.3f}"
            log(f"  {c.path} (epoch {c.epoch}{metric})")
    avg = average_state_dicts(sds, [c.path for c in chosen])
    meta = dict(format='pt', averaged=str(len(chosen)), epochs=','.join(str(c.epoch) for c in chosen),
                ema=str(bool(use_ema)).lower())
    if arch:
        meta['arch'] = str(arch)
    sha = _write_weights(avg, output, meta)
    return sha, chosen


def clean_checkpoint(path: str, output: str, use_ema: bool = False, add_hash: bool = True) -> Tuple[str, str]:
    """A training checkpoint -> weights-only safetensors (project layout, no optimizer state).

    ``output`` is a file name or a folder (then the checkpoint's 'arch', else its file name, names it). With
    ``add_hash`` the first 8 hex digits of the file's sha256 are added: ``name-<sha8>.safetensors``.
    Returns (written path, full sha256).
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    obj = _read(path)
    if use_ema and not any(isinstance(obj.get(k), dict) and obj[k] for k in ('state_dict_ema', 'model_ema')):
        raise CheckpointError(f"{path}: --use-ema given but the checkpoint holds no EMA weights")
    sd = convert_state_dict(unwrap(obj, use_ema=use_ema))
    meta = dict(format='pt', source=os.path.basename(path), ema=str(bool(use_ema)).lower())
    for key in ('arch', 'epoch', 'metric'):
        if key in obj and isinstance(obj[key], (str, int, float)):
            meta[key] = str(obj[key])
    data = safetensors_bytes(sd, meta)
    sha = hashlib.sha256(data).hexdigest()
    if output.endswith(os.sep) or os.path.isdir(output):
        base = str(obj.get('arch') or re.sub(r'\.pth(\.tar)?$|\.pt$|\.bin$', '', os.path.basename(path)))
        if use_ema:
            base += '_ema'
        folder, stem = output, base
    else:
        folder, name = os.path.split(output)
        stem = name[:-len('.safetensors')] if name.endswith('.safetensors') else name
    final = os.path.join(folder or '.', f"{stem}-{sha[:8]}.safetensors" if add_hash else f"{stem}.safetensors")
    write_with(final, lambda f: f.write(data))
    return final, sha
