"""Data sets that work offline: scikit-learn's bundled digits (8x8) and IDX files (MNIST,
Fashion-MNIST)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

__all__ = ["load_digits"]


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
