"""Atomic file writes: a temporary file in the same folder, flushed and fsynced, then renamed over the
target, so that a crash at any instant leaves either the old file or the new one, never half of one."""
import contextlib
import os
import tempfile
from typing import Callable, Dict, IO

import torch


@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'w'):
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path`` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: str):
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_with(path: str, writer: Callable[[IO], None], mode: str = 'wb'):
    with atomic_open(path, mode) as f:
        writer(f)


def save_torch(obj, path: str):
    """torch.save, atomically (training checkpoints)."""
    write_with(path, lambda f: torch.save(obj, f))


def save_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str] = None):
    """A weights-only safetensors file, atomically."""
    from safetensors.torch import save
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    write_with(path, lambda f: f.write(data))


def write_text(path: str, text: str):
    write_with(path, lambda f: f.write(text), mode='w')
