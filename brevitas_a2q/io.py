"""Output files are written to a temporary path and renamed: never half-written, never overwritten
unless asked. Inputs and outputs are checked up front, with messages that name the path."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from brevitas_a2q.errors import A2QInputError

__all__ = ["atomic_output", "check_input_file", "check_output_dir", "check_writable",
           "import_source"]


def _nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_can_create_in(directory: Path, what: str) -> None:
    """Create and remove a temporary file in ``directory`` (the only test that also holds for
    root, read-only mounts and ACLs); a clear error if that fails."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise A2QInputError(f"cannot write {what}: directory {directory} is not writable "
                            f"({err.strerror or err})") from None


def check_input_file(path: str | os.PathLike, what: str = "input file") -> Path:
    """``path`` as a Path if it is a readable regular file; else a clear error that names it and
    says whether it is missing or a directory."""
    path = Path(path)
    if path.is_dir():
        raise A2QInputError(f"{what} {path} is a directory, not a file")
    if not path.exists():
        raise A2QInputError(f"{what} {path} does not exist")
    if not path.is_file():
        raise A2QInputError(f"{what} {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise A2QInputError(f"{what} {path} is not readable (permission denied)")
    return path


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Refuse an output directory that is a file, lies under a file, or cannot be created or
    written into; nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise A2QInputError(f"{what} {path} is a file, not a directory")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise A2QInputError(f"{what} {path}: {existing} is a file, not a directory")
    _check_can_create_in(existing, f"{what} {path}")
    return path


def check_writable(path: str | os.PathLike, overwrite: bool = False, suffix: str | None = None,
                   what: str | None = None) -> Path:
    """Refuse an existing ``path`` unless ``overwrite``, a directory, a name without ``suffix``
    (e.g. ``".png"``) and a parent directory that is missing or not writable."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if path.is_dir():
        raise A2QInputError(f"{label} is a directory; give a file name")
    if suffix is not None and path.suffix.lower() != suffix:
        raise A2QInputError(f"{label}: the file name must end in {suffix}")
    if path.exists() and not overwrite:
        raise A2QInputError(f"{label} already exists; pass overwrite=True (CLI: --overwrite) "
                            "to replace it")
    if not path.parent.is_dir():
        existing = _nearest_existing(path.parent)
        if not existing.is_dir():
            raise A2QInputError(f"cannot write {label}: {existing} is a file, not a directory")
        raise A2QInputError(f"cannot write {label}: directory {path.parent} does not exist")
    _check_can_create_in(path.parent, label)
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


def import_source(source: str, where: str, file_label: str):
    """The module ``source`` names: a Python file (``path.py``, checked as ``file_label``) or an
    importable module (``pkg.mod``), for ``FILE.py:NAME`` / ``MODULE:NAME`` options. A failed
    import is one :class:`~brevitas_a2q.errors.A2QInputError` starting with ``where``, naming
    the source and the error."""
    import importlib
    import importlib.util

    from brevitas_a2q.errors import A2QInputError

    try:
        if source.endswith(".py"):
            check_input_file(Path(source), file_label)
            loader = importlib.util.spec_from_file_location(Path(source).stem, source)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
            return module
        return importlib.import_module(source)
    except A2QInputError:
        raise
    except Exception as err:  # the user's file failed to import: say which and why
        raise A2QInputError(f"{where}: importing {source} failed: {type(err).__name__}: "
                            f"{err}") from None
