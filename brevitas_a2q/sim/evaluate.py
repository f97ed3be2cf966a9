"""Accuracy under simulated accumulators and fine-tuning through them (Blumenfeld et al.,
ICLR 2024).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import nn

from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.sim.config import AccumulatorConfig, parse_accumulator
from brevitas_a2q.sim.layers import simulate_accumulators
from brevitas_a2q.sim.stats import SimulationStats


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    config: str | AccumulatorConfig | None = None,
    overrides: Mapping[str, str | AccumulatorConfig | None] | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> tuple[float, SimulationStats | None]:
    """Top-1 accuracy of ``model`` (eval mode) on ``dataset``, through the simulated accumulator
    ``config`` (exact when None). Returns ``(accuracy, stats)``."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    ctx = simulate_accumulators(model, config, overrides) if config is not None \
        else contextlib.nullcontext(None)
    correct = total = 0
    try:
        with ctx as stats:
            label = parse_accumulator(config).spec if config is not None else "exact"
            for x, y in tqdm(loader, desc=f"evaluate {label}", disable=None if progress else True,
                             leave=False):
                correct += int((model(x).argmax(dim=1) == y).sum())
                total += len(y)
    finally:
        model.train(was_training)
    return correct / max(total, 1), stats


def finetune(
    model: nn.Module,
    loader: torch.utils.data.DataLoader | torch.utils.data.Dataset,
    accumulator_config: str | AccumulatorConfig,
    epochs: int = 1,
    lr: float = 1e-3,
    overrides: Mapping[str, str | AccumulatorConfig | None] | None = None,
    gradient: str | None = None,
    progress: bool = True,
) -> list[float]:
    """Fine-tune ``model`` with its layers' accumulators simulated (Blumenfeld et al., ICLR 2024):
    Adam (``lr``, cosine schedule), cross-entropy, ``epochs`` passes over ``loader`` (a
    DataLoader, or a Dataset batched by 64, shuffled), gradients per ``gradient`` /
    the config's mode (identity STE by default). Returns each epoch's mean loss; leaves the model
    in eval mode and un-patched."""
    from brevitas_a2q.train.loop import train_epochs

    if epochs < 0:
        raise A2QInputError(f"epochs must be >= 0, got {epochs}")
    with simulate_accumulators(model, accumulator_config, overrides, gradient=gradient):
        return train_epochs(model, loader, epochs, lr=lr, progress=progress, desc="finetune")
