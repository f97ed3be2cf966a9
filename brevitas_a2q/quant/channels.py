"""Per *output channel* views of weight tensors for every Brevitas layer, transposed and grouped
convolutions included, and A2Q+ zero-centring over them.
"""

from __future__ import annotations

import torch
from brevitas.core.zero_point import PreZeroCenterZeroPoint
from torch import Tensor, nn


class OutputChannelView(nn.Module):
    """Per *output channel* view of a weight tensor: ``forward(w)`` gives rows ``(out, K)``.

    * Linear / Conv (``transposed=False``): weight ``(out, in/groups, k...)``, row ``o`` is
      ``w[o]`` (Brevitas's ``OverOutputChannelView``).
    * Transposed conv: weight ``(in, out/groups, k...)``; output channel ``o = g * (out/groups) + j``
      is computed from ``w[g*in/groups:(g+1)*in/groups, j, ...]``, so ``K = in/groups * prod(k)``.
      For ``groups = 1`` this is Brevitas's permuted view (``permute_dims`` swapping dims 0 and 1).

    For a transposed conv, each output element sums over at most ``K`` of these products (fewer
    with stride), so the channel's L1 norm over all of them is a safe bound.
    """

    def __init__(self, groups: int = 1, transposed: bool = False) -> None:
        super().__init__()
        self.groups = int(groups)
        self.transposed = bool(transposed)

    def _grouped(self, w: Tensor) -> Tensor:
        """``(groups, in/groups, out/groups, prod k)`` view of a transposed-conv weight."""
        return w.reshape(self.groups, w.shape[0] // self.groups, w.shape[1], -1)

    def out_channels(self, w: Tensor) -> int:
        return w.shape[1] * self.groups if self.transposed else w.shape[0]

    def forward(self, w: Tensor) -> Tensor:
        if not self.transposed:
            return w.reshape(w.shape[0], -1)
        if self.groups == 1:
            return w.transpose(0, 1).contiguous().reshape(w.shape[1], -1)
        return self._grouped(w).transpose(1, 2).reshape(self.out_channels(w), -1)

    def unview(self, rows: Tensor, w: Tensor) -> Tensor:
        """The inverse of :meth:`forward`: rows ``(out, K)`` back in ``w``'s shape."""
        if not self.transposed:
            return rows.reshape(w.shape)
        g, i, j = self.groups, w.shape[0] // self.groups, w.shape[1]
        return rows.reshape(g, j, i, -1).transpose(1, 2).reshape(w.shape)

    def l1_norms(self, q: Tensor) -> Tensor:
        """``sum |q|`` per output channel, without copying ``q``: shape ``(out,)``."""
        if not self.transposed:
            return torch.linalg.vector_norm(q.reshape(q.shape[0], -1), ord=1, dim=1)
        return torch.linalg.vector_norm(self._grouped(q), ord=1, dim=(1, 3)).reshape(-1)

    def sums(self, q: Tensor) -> Tensor:
        """``sum q`` per output channel: shape ``(out,)``."""
        if not self.transposed:
            return q.reshape(q.shape[0], -1).sum(1)
        return self._grouped(q).sum(dim=(1, 3)).reshape(-1)

    def expand(self, per_channel: Tensor, w: Tensor) -> Tensor:
        """A per-output-channel tensor (``out`` elements) in a shape that broadcasts against
        ``w``: ``(out, 1, ...)``, ``(1, out, 1, ...)`` (transposed) or, for a grouped transposed
        conv, ``(in, out/groups, 1, ...)`` (each input slice repeats its group's values)."""
        ones = [1] * (w.dim() - 2)
        if not self.transposed:
            return per_channel.reshape(w.shape[0], *[1] * (w.dim() - 1))
        if self.groups == 1:
            return per_channel.reshape(1, w.shape[1], *ones)
        g, i, j = self.groups, w.shape[0] // self.groups, w.shape[1]
        return per_channel.reshape(g, 1, j).expand(g, i, j).reshape(g * i, j, *ones)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, transposed={self.transposed}"


class OutputChannelZeroCenter(PreZeroCenterZeroPoint):
    """A2Q+ zero-centring ``v - mean(v)`` per output channel (Colbert et al. 2024, Sec. 3):
    Brevitas's ``PreZeroCenterZeroPoint`` over :class:`OutputChannelView` rows."""

    def get_zero_center(self, x: Tensor) -> Tensor:
        view = self.stats_input_view_shape_impl
        u = torch.mean(view(x), dim=self.stats_reduce_dim, keepdim=True)
        if isinstance(view, OutputChannelView):
            return -view.expand(u, x)
        return -u.view(self.stats_output_shape)
