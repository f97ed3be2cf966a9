"""Accumulator-constrained, error-correcting greedy rounding of one layer's weights.

The layer computes, per output channel ``c``, ``X~ . (s_c q_c)`` with integer weights ``q_c`` and
a post-scale ``s_c``, where ``X~`` are the (quantized) inputs the layer really sees once the
layers before it are quantized. Post-training, we want it to match the float layer's ``X . w_c``
on calibration data:

    minimize  || X~ (s_c q_c) - X w_c ||^2   over integer q_c within the accumulator budget.

This is GPFQ's objective (Lybrand & Saab, "A Greedy Algorithm for Quantizing Neural Networks",
JMLR 2021; Zhang, Zhou, Saab 2023), solved the OPTQ way (Frantar, Ashkboos, Hoefler, Alistarh,
"GPTQ/OPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", ICLR
2023): with ``H = X~^T X~`` (damped) and the least-squares target ``w'_c = H^-1 X~^T X w_c`` the
objective is ``(w'_c - s_c q_c)^T H (w'_c - s_c q_c)`` plus a constant, and OPTQ rounds one column
at a time, moving the rounding error of each column onto the columns not yet rounded through the
Cholesky factor of ``H^-1``.

The accumulator constraint is AXE's idea (Colbert, Pappalardo, Petri-Koenig, Umuroglu,
"Accumulator-Aware Post-Training Quantization", TMLR 2025, arXiv:2409.17092): keep a running
budget per channel and never let a column's integer leave it. Here the budget is the *exact
integer* A2Q/A2Q+ bound of :class:`brevitas_a2q.quant.pre_scaling.L1NormBound` (``floor(T)``):

* A2Q (Colbert et al., ICCV 2023, Eq. 15): ``||q_c||_1 <= floor(T)``;
* A2Q+ (Colbert et al., ICML 2024, Eq. 18): ``sum q+ <= floor(T) // 2`` and
  ``sum |q-| <= floor(T) // 2`` (each sign within half the budget, which is what the guard checks
  for rounded, only nearly zero-centred channels).

Every column's integer is clamped to what is left of the budget, in integer arithmetic, so the
result provably fits and needs no clipping afterwards. Before a column is rounded, the targets
of *all* columns still to round are projected onto the L1 ball of the remaining budget
(Euclidean projection, Duchi et al., ICML 2008, as in A2Q+'s EP-init), and the column takes its
projected value: budget is shared among the remaining columns instead of being spent by the
first ones. AXE soft-thresholds by a radius fixed before rounding; this projection adapts to the
budget actually left and to the error moved onto later columns.

Scale: each channel is rounded for several candidate post-scales ``s_c`` (fractions of the
max-based scale ``max|w'_c| / (2^(M-1) - 1)``, which tight budgets make too coarse); for each
integer result the least-squares scale ``s_c = q^T H w' / q^T H q`` is taken and the candidate
with the lowest objective is kept. Channels are independent, so this is exact per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ChannelBudget", "RoundingResult", "constrained_greedy_round", "l1_threshold"]

# post-scale candidates, as fractions of the max-based scale max|w'| / (2^(M-1) - 1)
SCALE_FRACTIONS = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15)


@dataclass(frozen=True)
class ChannelBudget:
    """The exact integer budget of every output channel of a layer.

    ``zero_centered`` False (A2Q): ``||q||_1 <= total``. True (A2Q+): ``sum q+ <= per_sign`` and
    ``sum |q-| <= per_sign``. ``max_int``: the weight range ``[-max_int, max_int]``.
    """

    floor_t: int  # floor(T) of L1NormBound
    zero_centered: bool
    max_int: int

    @property
    def per_sign(self) -> int:
        return self.floor_t // 2

    def fits(self, q: Tensor) -> Tensor:
        """Per row of integer ``q`` ``(out, K)``, whether it is within the budget (int64)."""
        q = q.to(torch.int64)
        if self.zero_centered:
            pos = q.clamp(min=0).sum(1)
            neg = (-q).clamp(min=0).sum(1)
            return (pos <= self.per_sign) & (neg <= self.per_sign)
        return q.abs().sum(1) <= self.floor_t


@dataclass
class RoundingResult:
    """Integer rows ``q`` ``(out, K)`` (int64), post-scales ``scale`` ``(out,)`` and, per channel,
    the objective ``|| X~ s q - X w ||^2 / n`` reached and the one of the float weights on ``X~``
    (``reference``, the error of float weights on the quantized inputs)."""

    q: Tensor
    scale: Tensor
    objective: Tensor
    scale_fraction: Tensor


def l1_threshold(a: Tensor, radius: Tensor) -> Tensor:
    """Per row of the non-negative ``a`` ``(rows, m)``, the smallest ``theta >= 0`` with
    ``sum relu(a - theta) <= radius`` (the soft threshold of the Euclidean projection onto the L1
    ball, Duchi, Shalev-Shwartz, Singer, Chandra, ICML 2008, Fig. 1). ``radius`` ``(rows,)`` may
    be 0 (then ``theta = max(a)``)."""
    if a.shape[1] == 0:
        return torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
    u = a.sort(dim=1, descending=True).values
    cssv = u.cumsum(dim=1) - radius.unsqueeze(1)
    j = torch.arange(1, a.shape[1] + 1, device=a.device, dtype=a.dtype)
    rho = ((u - cssv / j) > 0).to(a.dtype).mul(j).argmax(dim=1, keepdim=True)
    theta = (cssv.gather(1, rho) / (rho + 1).to(a.dtype)).clamp(min=0).squeeze(1)
    inside = a.sum(dim=1) <= radius
    return torch.where(inside, torch.zeros_like(theta), theta)


def _cholesky_inverse_upper(h: Tensor) -> Tensor:
    """Upper Cholesky factor of ``H^-1`` (OPTQ's ``Hinv``), damping more if ``H`` is singular."""
    damp = 0.01 * float(torch.diag(h).mean().clamp(min=1e-12))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(8):
        try:
            low = torch.linalg.cholesky(h + damp * eye)
            inverse = torch.cholesky_inverse(low)
            return torch.linalg.cholesky(inverse, upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError: not positive definite
            damp *= 10
    raise RuntimeError("the calibration Hessian stayed singular after damping")


def _round_columns(y: Tensor, u: Tensor, budget: ChannelBudget) -> tuple[Tensor, Tensor]:
    """The greedy pass: rows of ``y`` (targets in integer units, columns in processing order),
    ``u`` the upper Cholesky factor of ``H^-1`` in the same order. Returns the integers (int64)
    and the budget-left check values (for tests)."""
    rows, k = y.shape
    y = y.clone()
    q = torch.zeros(rows, k, dtype=torch.int64, device=y.device)
    used_pos = torch.zeros(rows, dtype=torch.int64, device=y.device)
    used_neg = torch.zeros(rows, dtype=torch.int64, device=y.device)
    max_int = budget.max_int
    for j in range(k):
        rest = y[:, j:]
        if budget.zero_centered:
            left_pos = (budget.per_sign - used_pos)
            left_neg = (budget.per_sign - used_neg)
            theta_pos = l1_threshold(rest.clamp(min=0), left_pos.to(y.dtype))
            theta_neg = l1_threshold((-rest).clamp(min=0), left_neg.to(y.dtype))
            col = y[:, j]
            projected = torch.where(col > 0, (col - theta_pos).clamp(min=0),
                                    -((-col) - theta_neg).clamp(min=0))
            qj = torch.round(projected).to(torch.int64).clamp(-max_int, max_int)
            qj = torch.minimum(qj, left_pos).maximum(-left_neg)
        else:
            left = budget.floor_t - used_pos - used_neg
            theta = l1_threshold(rest.abs(), left.to(y.dtype))
            col = y[:, j]
            projected = col.sign() * (col.abs() - theta).clamp(min=0)
            qj = torch.round(projected).to(torch.int64).clamp(-max_int, max_int)
            qj = torch.minimum(qj, left).maximum(-left)
        q[:, j] = qj
        used_pos += qj.clamp(min=0)
        used_neg += (-qj).clamp(min=0)
        if j + 1 < k:
            err = (y[:, j] - qj.to(y.dtype)) / u[j, j]
            y[:, j + 1:] -= err.unsqueeze(1) * u[j, j + 1:].unsqueeze(0)
    return q, used_pos + used_neg


def _representable(q: Tensor, target: Tensor, budget: ChannelBudget) -> Tensor:
    """A2Q+ only: the quantizer zero-centres the float weights before rounding, so it can only
    reproduce integers whose mean is below 1/2 in magnitude (``|sum q| <= (K - 1) // 2``; see
    :func:`brevitas_a2q.ptq.convert.load_integer_weights`). Rows past that give back units of their
    larger sign, cheapest first (smallest increase of ``(target - q)^2``); giving back only
    shrinks magnitudes, so every budget still holds."""
    if not budget.zero_centered:
        return q
    k = q.shape[1]
    limit = (k - 1) // 2
    q = q.clone()
    total = q.sum(1)
    for row in torch.nonzero(total.abs() > limit).flatten().tolist():
        sign = 1 if int(total[row]) > 0 else -1
        excess = abs(int(total[row])) - limit
        while excess > 0:
            members = (q[row] * sign) > 0
            # cost of taking one unit back from q toward 0: (t - q + sign)^2 - (t - q)^2
            diff = target[row] - q[row].to(target.dtype)
            cost = (diff + sign) ** 2 - diff ** 2
            cost = torch.where(members, cost, torch.full_like(cost, float("inf")))
            take = int(torch.argmin(cost))
            q[row, take] -= sign
            excess -= 1
    return q


def constrained_greedy_round(
    target: Tensor,
    hessian: Tensor,
    budget: ChannelBudget,
    act_order: bool = True,
    scale_fractions: tuple[float, ...] = SCALE_FRACTIONS,
) -> RoundingResult:
    """Round ``target`` (``w'``, float rows ``(out, K)``: one output channel per row) to integers
    within ``budget``, minimizing ``(w' - s q)^T H (w' - s q)`` per channel (see the module
    docstring). ``hessian`` is ``X~^T X~ / n`` ``(K, K)``; ``act_order`` rounds the columns of
    largest ``H_jj`` first (OPTQ's act-order). Every returned row provably fits ``budget``
    (checked here in int64; a failure is a bug and raises)."""
    target = target.to(torch.float64)
    h = hessian.to(torch.float64)
    out, k = target.shape
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    inverse_order = torch.argsort(order)
    u = _cholesky_inverse_upper(h[order][:, order])
    base = target.abs().amax(dim=1) / budget.max_int
    base = torch.where(base > 0, base, torch.ones_like(base))
    fractions = torch.tensor(scale_fractions, dtype=target.dtype)
    # every (candidate scale, channel) is a row of one greedy pass: rows are independent
    scales = (fractions.unsqueeze(1) * base.unsqueeze(0)).reshape(-1)
    rows = (target.repeat(len(scale_fractions), 1) / scales.unsqueeze(1))[:, order]
    q, _ = _round_columns(rows, u, budget)
    q = q[:, inverse_order]
    q = _representable(q, rows[:, inverse_order], budget)
    if not bool(budget.fits(q).all()):
        raise RuntimeError("constrained rounding left a channel over its budget (a bug)")
    qf = q.to(target.dtype)
    tiled = target.repeat(len(scale_fractions), 1)
    qhq = ((qf @ h) * qf).sum(1)
    qhw = ((qf @ h) * tiled).sum(1)
    whw = ((tiled @ h) * tiled).sum(1)
    fitted = torch.where((qhq > 0) & (qhw > 0), qhw / qhq.clamp(min=1e-300), torch.zeros_like(qhq))
    objective = whw - torch.where(fitted > 0, qhw * fitted, torch.zeros_like(qhw))
    objective = objective.reshape(len(scale_fractions), out)
    best = objective.argmin(dim=0)
    pick = best * out + torch.arange(out)
    q_best = q[pick]
    scale = fitted[pick]
    zero = scale <= 0  # all-zero rows (or rows anti-correlated with the target): q = 0
    q_best[zero] = 0
    scale = torch.where(zero, scales[pick], scale)
    return RoundingResult(q=q_best, scale=scale.to(torch.float32),
                          objective=objective.min(dim=0).values,
                          scale_fraction=fractions[best])
