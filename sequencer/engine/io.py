"""Atomic file writes: a temporary file in the same folder, flushed and fsynced, then renamed over the
target, so that a crash at any instant leaves either the old file or the new one, never half of one."""
import contextlib
import os
import tempfile
from typing import Callable, Dict, IO

import torch

from ..errors import UserError


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _temp_in(folder: str, name: str):
    """(fd, path) of a new temporary file in ``folder`` (created with its parents if missing)."""
    os.makedirs(folder, exist_ok=True)
    return tempfile.mkstemp(prefix='.' + name + '.', suffix='.tmp', dir=folder)


def check_output(path: str, what: str, folder: bool = False) -> None:
    """Fail early, with one line naming ``what`` (the option) and ``path``, where an output could not be written:
    a command checks its outputs before its long work, not after it. ``folder``: ``path`` is a folder that will
    hold the outputs (created if missing), else a file (its folder is created if missing). Writes and removes a
    temporary file there."""
    if not folder and os.path.isdir(path):
        raise UserError(f"{what} {path}: is a folder, not a file")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path}: is a file, not a folder")
    target = path if folder else os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = _temp_in(target, os.path.basename(path) or 'check')
    except OSError as e:
        raise UserError(f"{what} {path}: cannot write there ({_reason(e)})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'w'):
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path`` atomically. Where the
    folder cannot be created, the file cannot be made or the rename fails, a ``UserError`` names ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = _temp_in(folder, os.path.basename(path))
    except OSError as e:
        raise UserError(f"cannot write {path}: {_reason(e)}") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise UserError(f"cannot write {path}: {_reason(e)}") from None
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
    """``writer(f)`` into ``path``, atomically; a failed write (a full disk) is a ``UserError`` naming ``path``, and
    the previous file stays as it was."""
    try:
        with atomic_open(path, mode) as f:
            writer(f)
    except OSError as e:
        raise UserError(f"cannot write {path}: {_reason(e)}") from None


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
