"""Atomic file writes: a temporary file in the same folder, flushed and fsynced, then renamed over the
target, so that a crash at any instant leaves either the old file or the new one, never half of one."""
import contextlib
import errno
import os
import tempfile
from typing import IO, Callable, Dict, Optional

import torch

from ..errors import UserError


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _file_in_the_way(folder: str):
    """The nearest existing one of ``folder`` and its parents where that is a file, not a folder; else None."""
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder if folder and not os.path.isdir(folder) else None


def _temp_in(folder: str, name: str):
    """(fd, path) of a new temporary file in ``folder`` (created with its parents if missing). Where a file stands
    in the place of the folder or of one of its parents, the ``OSError`` names it (makedirs says 'File exists')."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        blocker = _file_in_the_way(folder)
        if blocker is None:
            raise
        raise NotADirectoryError(errno.ENOTDIR, f"Not a directory: {blocker} is a file, not a folder") from None
    return tempfile.mkstemp(prefix='.' + name + '.', suffix='.tmp', dir=folder)


def _folder_of(path: str) -> str:
    """The folder of a file's ``path``, as given (relative stays relative, for messages)."""
    return os.path.dirname(os.path.normpath(path)) or os.curdir


def check_output(path: str, what: str, folder: bool = False) -> None:
    """Fail early, with one line naming ``what`` (the option) and ``path``, where an output could not be written:
    a command checks its outputs before its long work, not after it. ``folder``: ``path`` is a folder that will
    hold the outputs (created if missing), else a file (its folder is created if missing). Writes and removes a
    temporary file there."""
    if not folder and os.path.isdir(path):
        raise UserError(f"{what} {path}: is a folder, not a file")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path}: is a file, not a folder")
    target = path if folder else _folder_of(path)
    try:
        fd, tmp = _temp_in(target, os.path.basename(path) or 'check')
    except OSError as e:
        raise UserError(f"{what} {path}: cannot write there ({_reason(e)})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'w', check: Optional[Callable[[str], None]] = None):
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path`` atomically. Where the
    folder cannot be created, the file cannot be made or the rename fails, a ``UserError`` names ``path``.
    ``check(temporary_path)``, if given, runs on the written file before the rename: if it raises, the temporary
    file is removed and ``path`` stays as it was (an export that does not reproduce its model)."""
    folder = _folder_of(path)
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
        if check is not None:
            check(tmp)
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


def write_with(path: str, writer: Callable[[IO], None], mode: str = 'wb',
               check: Optional[Callable[[str], None]] = None):
    """``writer(f)`` into ``path``, atomically; a failed write (a full disk) is a ``UserError`` naming ``path``, and
    the previous file stays as it was. ``check``: see ``atomic_open``."""
    try:
        with atomic_open(path, mode, check) as f:
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
