"""Atomic file writes and checksums: an interrupted run never leaves a half file under its final name."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from dd_dist.errors import UserError

# OS errors that the user fixes (free space, permissions, another path) rather than bugs: one line each.
_FULL = {errno.ENOSPC, errno.EDQUOT}
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST}


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temp file beside `path`, then rename it into place.

    A full disk or an unwritable folder is a UserError; the file at `path`, if any, is left as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in _FULL:
            raise UserError(f"no space left on the device while writing {path} (any earlier file there is "
                            f"unchanged): free some space and run again") from None
        if e.errno in _UNWRITABLE:
            raise UserError(f"cannot write {path}: {e.strerror}") from None
        raise
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(path, what: str) -> None:
    """Refuse, before any work, a folder that cannot be created or written; creates nothing.
    URIs (s3://, gs://, ...) are left to their own clients."""
    if "://" in str(path):
        return
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {path} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} is not writable ({existing} is read-only or not ours)")


def write_json(path, obj: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True)))


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
