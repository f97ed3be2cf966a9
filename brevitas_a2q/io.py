"""Output files are written to a temporary path and renamed: never half-written, never overwritten
unless asked."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from brevitas_a2q.errors import A2QInputError

__all__ = ["atomic_output", "check_writable"]


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing ``path`` unless ``overwrite``; refuse a missing parent directory."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise A2QInputError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) "
                            "to replace it")
    if not path.parent.is_dir():
        raise A2QInputError(f"cannot write {path}: directory {path.parent} does not exist")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else remove it."""
    path = check_writable(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes it owner-only: give it the permissions of a new file
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
