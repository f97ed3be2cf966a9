"""IDX loading (MNIST / Fashion-MNIST format): round trip through hand-written files, gz or not,
and clear errors for missing directories, missing files and corrupt headers."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.train.data import IDX_FILES, load_dataset, load_idx_dataset, read_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """IDX by the format's definition: 0, 0, type 0x08 (uint8), ndim, big-endian uint32 dims."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_dataset(root: Path, n_train: int = 12, n_test: int = 5, gz=(True, False, True, False)):
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 6, 7)),
              "train_labels": rng.integers(0, 10, n_train),
              "test_images": rng.integers(0, 256, (n_test, 6, 7)),
              "test_labels": rng.integers(0, 10, n_test)}
    root.mkdir(parents=True, exist_ok=True)
    for (key, stem), zipped in zip(IDX_FILES.items(), gz, strict=True):
        write_idx(root / stem, arrays[key], zipped)
    return arrays


def test_read_idx_round_trip_plain_and_gz(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (False, True):
        path = write_idx(tmp_path / f"x{gz}", a, gz)
        np.testing.assert_array_equal(read_idx(path), a)


def test_load_idx_dataset_mixed_gz(tmp_path):
    arrays = make_dataset(tmp_path / "d")
    train, test = load_idx_dataset("mnist", tmp_path / "d")
    x, y = train.tensors
    assert tuple(x.shape) == (12, 1, 6, 7) and tuple(test.tensors[0].shape) == (5, 1, 6, 7)
    np.testing.assert_allclose(x.squeeze(1).numpy() * 255, arrays["train_images"], atol=1e-4)
    np.testing.assert_array_equal(y.numpy(), arrays["train_labels"])
    np.testing.assert_array_equal(test.tensors[1].numpy(), arrays["test_labels"])
    assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_missing_directory_names_it(tmp_path):
    with pytest.raises(A2QInputError, match="does not exist"):
        load_idx_dataset("fashion-mnist", tmp_path / "nowhere")


def test_a_file_or_directory_in_the_wrong_place_is_named_as_such(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(A2QInputError, match="a-file is a file, not a directory"):
        load_idx_dataset("mnist", tmp_path / "a-file")
    (tmp_path / "a-dir").mkdir()
    with pytest.raises(A2QInputError, match="a-dir is a directory, not a file"):
        read_idx(tmp_path / "a-dir")


def test_missing_file_names_it(tmp_path):
    make_dataset(tmp_path / "d")
    next((tmp_path / "d").glob("t10k-labels*")).unlink()
    with pytest.raises(A2QInputError, match="t10k-labels-idx1-ubyte"):
        load_idx_dataset("mnist", tmp_path / "d")


def test_corrupt_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(A2QInputError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    good = write_idx(tmp_path / "short", np.zeros((3, 4), np.uint8))
    good.write_bytes(good.read_bytes()[:-2])
    with pytest.raises(A2QInputError, match="announces shape"):
        read_idx(good)


def test_unknown_dataset():
    with pytest.raises(A2QInputError, match="unknown dataset 'cifar10'"):
        load_dataset("cifar10")


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"{FASHION} (Debian dataset-fashion-mnist) "
                    "is not installed")
def test_fashion_mnist_from_debian_package():
    train, test = load_idx_dataset("fashion-mnist")
    assert tuple(train.tensors[0].shape) == (60000, 1, 28, 28)
    assert tuple(test.tensors[0].shape) == (10000, 1, 28, 28)
    # Fashion-MNIST is balanced: 6,000 / 1,000 images of each of the 10 classes
    assert train.tensors[1].bincount().tolist() == [6000] * 10
    assert test.tensors[1].bincount().tolist() == [1000] * 10
