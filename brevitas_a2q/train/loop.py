"""Training and evaluation loops shared by the recipes, the benchmarks and the CLI.
"""

from __future__ import annotations

import torch
from torch import nn

from brevitas_a2q.train.penalty import a2q_penalty
from brevitas_a2q.train.targets import track_accumulator_inputs


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
    penalty_weight: float = 0.0,
    desc: str = "epoch",
    progress: bool = True,
) -> float:
    """One pass of cross-entropy (plus ``penalty_weight * a2q_penalty``) over ``loader``, stepping
    ``schedule`` per batch, with a tqdm bar (on a terminal). Returns the mean loss; leaves the model
    in eval mode."""
    from tqdm.auto import tqdm

    model.train()
    if penalty_weight:
        track_accumulator_inputs(model)
    total = 0.0
    bar = tqdm(loader, desc=desc, disable=None if progress else True, leave=False)
    for x, y in bar:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if penalty_weight:
            loss = loss + penalty_weight * a2q_penalty(model)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        total += loss.item()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return total / max(len(loader), 1)


def train_epochs(
    model: nn.Module,
    data: torch.utils.data.Dataset | torch.utils.data.DataLoader,
    epochs: int,
    lr: float = 1e-2,
    batch_size: int = 64,
    penalty_weight: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "epoch",
) -> list[float]:
    """Adam with a cosine schedule over all steps, :func:`train_one_epoch` ``epochs`` times.
    ``data`` is a DataLoader, or a Dataset shuffled in batches of ``batch_size``. Returns the mean
    loss of each epoch and leaves the model in eval mode."""
    loader = data
    if isinstance(data, torch.utils.data.Dataset):
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs * len(loader), 1))
    return [train_one_epoch(model, loader, optimizer, schedule, penalty_weight,
                            f"{desc} {epoch + 1}/{epochs}", progress)
            for epoch in range(epochs)]


@torch.no_grad()
def accuracy(model: nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` in eval mode on ``dataset``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)
