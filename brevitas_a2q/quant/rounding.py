"""Integer rounding of the A2Q quantizers: Brevitas's round-to-zero, or *budgeted rounding*
(round to nearest, then per output channel take back the cheapest round-up units until the
exact integer L1 budget holds).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# the integer rounding of the A2Q quantizers: Brevitas's round-to-zero, or budgeted rounding
ROUNDINGS = ("zero", "budgeted")
# budgets above this are never binding (|q| < 2^31 per weight): keeps the sums in int64
_BUDGET_CAP = 2**62


def check_rounding(rounding: str) -> str:
    """``rounding`` if it is one of :data:`ROUNDINGS`, else a ``ValueError`` naming the choices."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"weight rounding must be one of {', '.join(map(repr, ROUNDINGS))}, "
                         f"got {rounding!r}")
    return rounding


@torch.no_grad()
def budgeted_take_back(q: Tensor, y: Tensor, budget: int, zero_centered: bool) -> Tensor | None:
    """Per row, the units to subtract from the round-to-nearest integers ``q`` so that they fit the
    integer budget: a tensor of ``q``'s shape in ``{-1, 0, 1}`` (``q - result`` fits), or None
    when every row already fits.

    ``q`` (``(out, K)`` rows, whole numbers, already clipped to the weight range) is the nearest
    integer vector to the scaled weights ``y`` (same shape). The budget is

    * A2Q: ``||q||_1 <= budget`` with ``budget = floor(T)``;
    * A2Q+: ``sum q+ <= budget // 2`` and ``sum |q-| <= budget // 2``, i.e.
      ``2 * max(sum q+, sum |q-|) <= floor(T)`` (:meth:`L1NormBound.effective_l1_norms`). A2Q+'s
      ``||q||_1 <= (2^P - 2) / (2^N - 1)`` (A2Q+ Eq. 18) assumes ``sum q = 0``: then
      ``q . x <= (2^N - 1) * sum q+`` for unsigned ``x`` and the signed case reduces to it. Rounded
      integers are not exactly zero-centred, so each sign's sum must be within ``T/2``; an
      unbalanced ``||q||_1 <= T`` would let ``q . x`` overflow.

    Objective: among integer vectors in the weight range within the budget, minimize
    ``||q - y||_2``. Taking a unit back from a weight rounded to ``k`` costs
    ``(|y| - k + 1)^2 - (|y| - k)^2 = 2 (|y| - k) + 1``: in ``[0, 1)`` for a magnitude that was
    rounded *up* (``k > |y|``), at least 1 for any other unit. The cost is separable and convex,
    so taking back the cheapest units first is optimal; when round-to-zero fits the budget (the A2Q
    construction guarantees it, up to float error) only rounded-up units are taken back, at most
    all of them (which gives round-to-zero). If even that does not fit (float error), every
    rounded-up unit is taken back and the caller's exact guard finishes the job.

    Vectorized: one stable sort of the take-back costs per row, cumulative counts per sign group,
    exact int64 sums. Runs on ``q``'s device.
    """
    budget = min(int(budget), _BUDGET_CAP)
    qi = q.to(torch.int64)
    if zero_centered:
        half = budget // 2
        excess_pos = (qi.clamp(min=0).sum(1) - half).clamp(min=0)
        excess_neg = ((-qi).clamp(min=0).sum(1) - half).clamp(min=0)
        if not bool(((excess_pos > 0) | (excess_neg > 0)).any()):
            return None
    else:
        excess_pos = excess_neg = (qi.abs().sum(1) - budget).clamp(min=0)
        if not bool((excess_pos > 0).any()):
            return None
    mag_q, mag_y = q.abs(), y.abs()
    up = mag_q > mag_y  # rounded up: one unit of the budget that can be taken back
    cost = torch.where(up, mag_y - mag_q, torch.full_like(mag_y, math.inf))  # in [-0.5, 0)
    order = torch.sort(cost, dim=1, stable=True).indices
    positive = q > 0
    if zero_centered:
        groups = ((up & positive, excess_pos), (up & ~positive, excess_neg))
    else:
        groups = ((up, excess_pos),)
    take = torch.zeros_like(up)
    for members, excess in groups:
        in_order = members.gather(1, order)
        rank = torch.cumsum(in_order.to(torch.int64), dim=1)  # 1-based rank in the group
        take |= in_order & (rank <= excess.unsqueeze(1))
    take = torch.zeros_like(up).scatter_(1, order, take)
    return torch.where(take, torch.sign(q), torch.zeros_like(q))
