"""Evaluation: top-1 / top-5 / loss over a loader, on one process or summed over all DDP ranks."""
import math
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..fast.cpu_kernel import prepare_for_compile


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """torch.autocast for ``amp_dtype`` on ``device`` (a no-op context when amp_dtype is None)."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def _compile(module: nn.Module, backend: Optional[str], mode: Optional[str]) -> nn.Module:
    """``torch.compile`` (which only wraps: compilation happens at the first call); an unknown backend or mode
    is a user error naming its flag."""
    from ..errors import UserError, first_line
    backend = backend or 'inductor'
    if mode and backend != 'inductor':   # other backends would ignore the mode without a word
        raise UserError(f"--torchcompile-mode {mode}: only the inductor backend takes a mode, not --torchcompile "
                        f"{backend}")
    try:
        return torch.compile(module, backend=backend, mode=mode)
    except RuntimeError as e:
        flag = f'--torchcompile-mode {mode}' if mode and 'mode' in str(e) else f'--torchcompile {backend}'
        raise UserError(f"{flag}: {first_line(e)}") from None


def check_compile_flags(backend: Optional[str], mode: Optional[str]) -> None:
    """Reject a bad ``--torchcompile`` / ``--torchcompile-mode`` before any work is done (or any file written)."""
    if backend or mode:
        _compile(nn.Identity(), backend, mode)


def torch_compile(module: nn.Module, device: torch.device, backend: Optional[str], mode: Optional[str]) -> nn.Module:
    """``torch.compile`` for ``--torchcompile [BACKEND]`` / ``--torchcompile-mode MODE`` (a mode alone means
    inductor). The CPU kernel is loaded first, so that compiled graphs keep its ops."""
    prepare_for_compile(device)
    return _compile(module, backend, mode)


def label_count(dataset) -> Optional[int]:
    """How many outputs the labels of ``dataset`` need: its largest class index + 1 (a class map may leave
    gaps), else its number of classes; None where the dataset does not say."""
    reader = getattr(dataset, 'reader', None)
    mapping = getattr(reader, 'class_to_idx', None) or getattr(dataset, 'class_to_idx', None)
    if isinstance(mapping, dict) and mapping and all(isinstance(v, int) for v in mapping.values()):
        return max(mapping.values()) + 1
    classes = getattr(dataset, 'classes', None)
    return len(classes) if classes else None


def check_num_classes(outputs: Optional[int], dataset, weights: str, data: str) -> None:
    """Labels the model has no output for cannot be scored: one ``UserError`` naming the weights (``weights``:
    a checkpoint, or the model and where its head comes from), its output count, the data folder (its split
    folder where the dataset knows it, else ``data``) and its class count, before any image is read. More
    outputs than classes is fine (an ImageNet model on a subset)."""
    from ..errors import UserError
    classes = label_count(dataset)
    if outputs is not None and classes and classes > outputs:
        data = getattr(getattr(dataset, 'reader', None), 'root', None) or data
        raise UserError(f"{weights}: the model has {outputs} outputs but {data} has {classes} classes (the labels "
                        f"past its outputs cannot be scored); evaluate it on data with at most {outputs} classes")


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader,
        device: torch.device = torch.device('cpu'),
        amp_dtype: Optional[torch.dtype] = None,
        class_index: Optional[torch.Tensor] = None,
        log_every: int = 0,
        log=print,
) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``.

    ``class_index`` restricts the logits to a subset of the outputs (e.g. the 200 classes of
    ImageNet-A / -R): targets then index into that subset. Under torch.distributed the counts of all
    ranks are summed, so every rank returns the same figures.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    skipped = 0  # unreadable samples a loader dropped (``--bad-samples skip``)
    start = time.time()
    for step, batch in enumerate(loader):
        images, target = batch[0], batch[1]  # loaders may add a third item (skipped-sample count)
        skipped += int(batch[2]) if len(batch) > 2 else 0
        if images is None:
            continue
        top_label = int(target.max()) if target.numel() else -1  # read on the host, before the copy
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        if class_index is not None:
            logits = logits[:, class_index.to(device)]
        if top_label >= logits.shape[1]:  # else an IndexError deep in cross_entropy
            from ..errors import UserError
            raise UserError(f"label {top_label} in the data, but the model has {logits.shape[1]} outputs: "
                            f"the data has more classes than the model can score")
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk == target[:, None]
        totals += torch.stack([
            F.cross_entropy(logits, target, reduction='sum').double(),
            hit[:, :1].sum().double(), hit.sum().double(), torch.tensor(float(target.numel()), device=device,
                                                                          dtype=torch.float64)])
        if log_every and (step + 1) % log_every == 0:
            n = totals[3].item()
            log(f"eval [{step + 1}/{len(loader)}] top1 {100 * totals[1].item() / n:.2f} "
                f"({n / (time.time() - start):.1f} img/s)")
    totals = torch.cat([totals, torch.tensor([float(skipped)], dtype=torch.float64, device=device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, count, skipped = totals.tolist()
    if not count:   # nothing evaluated (every sample skipped as unreadable): no figure, not a zero
        return {'loss': math.nan, 'top1': math.nan, 'top5': math.nan, 'count': 0, 'skipped': int(skipped)}
    return {'loss': loss / count, 'top1': 100 * top1 / count, 'top5': 100 * top5 / count, 'count': int(count),
            'skipped': int(skipped)}
