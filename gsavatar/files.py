"""Checks and clean-up for the files a command writes, shared by every package (the promise in the
README's "What happens when things go wrong": outputs are checked before any work, and clean-up
never hides the error that made it necessary)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from gsavatar.errors import InputError


def remove_quietly(path: str | os.PathLike) -> None:
    """Delete a temporary file if it is there; never raise (cleanup must not hide the real error,
    and on a read-only filesystem even deleting a file that is not there can fail)."""
    with contextlib.suppress(OSError):
        Path(path).unlink(missing_ok=True)


def check_writable_dir(folder: str | os.PathLike, what: str = "the output directory") -> Path:
    """``folder`` if a file can be created in it (tried: a probe file is written and removed), else a
    one-line :class:`~gsavatar.errors.InputError`. Commands call it before any long work."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{what} {folder} does not exist")
    try:
        fd, name = tempfile.mkstemp(prefix=".gsavatar-write-check.", dir=folder)
    except OSError as e:
        raise InputError(f"cannot write to {what} {folder} ({e.strerror or type(e).__name__})") from None
    os.close(fd)
    remove_quietly(name)
    return folder


def check_output_file(path: str | os.PathLike, suffix: str) -> Path:
    """An output file the command can write: named ``*suffix``, not a directory, in a directory that
    exists and takes new files (checked before any work, so nothing fails after it)."""
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise InputError(f"the output must be a {suffix} file (got {path})")
    if path.is_dir():
        raise InputError(f"the output {path} is a directory")
    check_writable_dir(path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"the output {path} exists and cannot be overwritten (no write permission)")
    return path


def check_creatable_dir(folder: str | os.PathLike, what: str = "the output directory") -> Path:
    """``folder`` if it is a writable directory or can be created (its nearest existing ancestor is
    writable), else a one-line :class:`~gsavatar.errors.InputError`. Creates nothing."""
    folder = Path(folder)
    if folder.is_dir():
        return check_writable_dir(folder, what)
    if folder.exists():
        raise InputError(f"{what} {folder} exists and is not a directory")
    ancestor = folder.absolute().parent
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{what} {folder} cannot be created: {ancestor} is not a directory")
    check_writable_dir(ancestor, f"the folder that would hold {what}")
    return folder


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, busy: str):
    """Hold an exclusive lock on the file ``path`` (created if missing) while the block runs;
    :class:`InputError` ``busy`` when another process holds it. The operating system drops the
    lock when the process ends, however it ends (SIGKILL included): a killed process never leaves
    a stale lock behind."""
    import fcntl

    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise InputError(busy) from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
