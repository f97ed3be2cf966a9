"""numba's on-disk cache of this package's kernels, invalidated by a change to any of their
source files.

numba stamps a cached function with a hash of the one file that defines it, and does not see a
change in functions it calls from other files (a limitation its user guide states; numba PRs
#8396 and #9563 set out to lift it). The kernels of ``_jit_events.py`` and ``_jit_blocks.py``
inline the chain's helpers from ``_jit.py``, so an edit there alone (a checkout, ``git pull`` in
an editable install) would leave them running the old code, silently. :func:`install` gives this
directory's kernel modules (``_jit*.py``) numba's own locators with one stamp for all of them,
:func:`sources_digest`; numba then recompiles whatever is stale.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

SOURCE_GLOB = "_jit*.py"
_HERE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=8)
def _digest(stamps: tuple) -> str:
    sha = hashlib.sha256()
    for path, _, _ in stamps:
        sha.update(path.name.encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()


def sources_digest(directory: Path = _HERE) -> str:
    """One SHA-256 of every ``_jit*.py`` file of ``directory`` (names and contents), recomputed
    when a file's size or modification time changes."""
    files = sorted(directory.glob(SOURCE_GLOB))
    return _digest(tuple((p, p.stat().st_mtime_ns, p.stat().st_size) for p in files))


def install() -> bool:
    """Put a :func:`_stamped` copy of each of numba's source-file locators (the user's
    ``NUMBA_CACHE_DIR``, ``__pycache__`` beside the file, the user-wide cache), in numba's
    order, in front of numba's own, once. False, with numba's per-file stamps left in place,
    where this numba has no such hook (``numba.core.caching.CacheImpl._locator_classes``,
    ``_CacheImpl`` in older numba)."""
    try:
        from numba.core import caching
    except ImportError:
        return False
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    classes = getattr(impl, "_locator_classes", None)
    if not isinstance(classes, list):
        return False
    if any(getattr(c, "stamps_kernel_sources", False) for c in classes):
        return True
    names = ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")
    bases = [getattr(caching, name) for name in names if hasattr(caching, name)]
    classes[:0] = [_stamped(base) for base in bases if base in classes]
    return True


def _stamped(base: type) -> type:
    """``base`` (a numba cache locator) for this directory's kernel modules only, with the
    stamp :func:`sources_digest`; ``from_function`` returns None for other files, which numba
    then gives to its own locators."""

    class Stamped(base):
        stamps_kernel_sources = True

        def get_source_stamp(self):
            return sources_digest(Path(self._py_file).resolve().parent)

        @classmethod
        def from_function(cls, py_func, py_file):
            path = Path(os.path.abspath(py_file))
            if path.parent.resolve() != _HERE or not path.match(SOURCE_GLOB):
                return None
            return super().from_function(py_func, py_file)

    Stamped.__name__ = Stamped.__qualname__ = f"KernelSources{base.__name__}"
    return Stamped
