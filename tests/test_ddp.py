"""Training with torch DistributedDataParallel (gloo, 2 CPU processes): gradients are synced,
every rank ends with identical integer weights within the accumulator bound, and the rank-0
checkpoint loads."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from brevitas_a2q.analysis.audit import capture_layers
from brevitas_a2q.quant import bounds
from brevitas_a2q.train.checkpoint import load_checkpoint, save_checkpoint
from brevitas_a2q.train.models import build_mlp

KWARGS = {"quant": "a2q+", "acc_bits": 12, "hidden": [32]}
WORLD = 2
STEPS = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _integer_weights(model, x) -> list[np.ndarray]:
    return [c.rows.to(torch.int64).numpy() for c in capture_layers(model, x)]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # same initial model on every rank (DDP also broadcasts it)
        model = build_mlp(**KWARGS)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of data
        for _ in range(STEPS):
            x = torch.rand(16, 1, 8, 8, generator=gen)
            y = torch.randint(0, 10, (16,), generator=gen)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()
                               if p.grad is not None])
            gathered = [torch.empty_like(grads) for _ in range(WORLD)]
            dist.all_gather(gathered, grads)
            assert all(torch.equal(gathered[0], g) for g in gathered), "gradients not synced"
            optimizer.step()
        probe = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(7))
        model.eval()
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), *_integer_weights(model, probe))
        if rank == 0:
            save_checkpoint(os.path.join(out_dir, "model.pt"), model, "mlp", KWARGS)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_training_keeps_ranks_identical_and_within_bound(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [np.load(tmp_path / f"rank{r}.npz") for r in range(WORLD)]
    ranks = [[f[k] for k in sorted(f.files, key=lambda n: int(n.split("_")[1]))]
             for f in per_rank]
    for q0, q1 in zip(*ranks, strict=True):
        np.testing.assert_array_equal(q0, q1)
    probe = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    loaded = load_checkpoint(tmp_path / "model.pt").model
    captures = capture_layers(loaded, probe)
    for cap, q in zip(captures, ranks[0], strict=True):
        np.testing.assert_array_equal(cap.rows.to(torch.int64).numpy(), q)
        lo, hi = bounds.input_range(cap.input_bits, cap.input_signed)
        assert bounds.exact_accumulator_range(q, lo, hi).signed_bits <= cap.target_bits == 12
