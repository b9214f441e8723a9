"""Atomic replacement of a file's content, shared by the executors that edit files."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

# Mode of a new file before the umask applies, as `touch` creates it.
NEW_FILE_MODE = 0o666


def replace_file(path: Path, data: bytes, *, new_file_mode: int = NEW_FILE_MODE) -> None:
    """Replace the file's content in one step: write a temp file beside it, fsync, rename.

    An existing file keeps its mode, and its owner when the process may set
    it. A symlink stays a link and its target is replaced. Raises OSError,
    which each executor reports with its own message.
    """
    target = path.resolve() if path.is_symlink() else path
    try:
        current = target.stat()
    except FileNotFoundError:
        current = None

    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        mode = stat.S_IMODE(current.st_mode) if current else new_file_mode
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(descriptor, "wb") as handle:
            if current is not None:
                # os.open applied the umask, but an existing file keeps its exact mode.
                os.fchmod(handle.fileno(), mode)
                _copy_owner(handle.fileno(), current)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def _copy_owner(descriptor: int, current: os.stat_result) -> None:
    if (current.st_uid, current.st_gid) == (os.getuid(), os.getgid()):
        return
    try:
        os.fchown(descriptor, current.st_uid, current.st_gid)
    except PermissionError:
        # Only root may give a file away, so the new file keeps this user as owner.
        pass


def fsync_directory(directory: Path) -> None:
    """Make a rename in the directory durable. Some file systems do not support fsync on a directory."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
