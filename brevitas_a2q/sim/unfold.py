"""Convolution inputs unfolded into rows of dot-product operands (``F.unfold``'s columns,
transposed), for the simulated accumulators of :mod:`.layers`: :func:`conv_windows` (a layer's
window geometry), :func:`im2col` (any dtype, int8 included) and its adjoint :func:`fold_rows`,
and :class:`Unfold`, the two as a differentiable operation; :func:`im2col_channels_last` and
its adjoint :func:`fold_channels_last`, the same windows with the channel axis last.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvWindows(NamedTuple):
    """Where a convolution's windows lie in its input, as 2-d (a 1-d convolution's with a
    height of 1): the arguments of :func:`im2col` after the input."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int]
    size: tuple[int, int]  # the output's height and width


def conv_windows(layer: nn.Module, x: Tensor) -> tuple[Tensor, ConvWindows, bool]:
    """``(x4, windows, one_d)``: ``x`` as (B, C, H, W), the windows of ``layer`` (a
    QuantConv1d/2d, or a :class:`~brevitas_a2q.sim.transposed.DirectConv`) over it, and whether
    the layer is 1-d."""
    one_d = len(layer.kernel_size) == 1
    if one_d:
        x4 = x.unsqueeze(-2)
        kernel, stride = (1, layer.kernel_size[0]), (1, layer.stride[0])
        dilation = (1, layer.dilation[0])
        padding = (0, 0) if layer.padding == "valid" else (0, layer.padding[0])
    else:
        x4, kernel, stride = x, tuple(layer.kernel_size), tuple(layer.stride)
        dilation = tuple(layer.dilation)
        padding = (0, 0) if layer.padding == "valid" else tuple(layer.padding)
    size = tuple((x4.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1)
                 // stride[i] + 1 for i in range(2))
    return x4, ConvWindows(kernel, stride, dilation, padding, size), one_d


def _window(padded: Tensor, i: int, j: int, stride, dilation, size) -> Tensor:
    """The (B, C, *size) view of a padded input that kernel offset ``(i, j)`` reads."""
    h0, w0 = i * dilation[0], j * dilation[1]
    return padded[:, :, h0:h0 + stride[0] * (size[0] - 1) + 1:stride[0],
                  w0:w0 + stride[1] * (size[1] - 1) + 1:stride[1]]


def _offset(out6: Tensor, i: int, j: int, channels_last: bool) -> Tensor:
    """Kernel offset ``(i, j)``'s (B, *size, C) slice of a (B, *size, C, kh, kw) array, or of
    a (B, *size, kh, kw, C) one (``channels_last``)."""
    return out6[:, :, :, i, j] if channels_last else out6[..., i, j]


def _gather(x4: Tensor, kernel, stride, dilation, padding, size, channels_last: bool) -> Tensor:
    """Each kernel offset's window of ``x4``, copied channels-last into its slice
    (:func:`_offset`) of a new (B, *size, ...) array. ``channels_last``: from a channels-last
    copy of the padded input, so that every copy reads and writes runs of channels (faster
    than copying each window from the input's own layout); otherwise the writes are strided by
    the kernel's size either way, and the extra copy does not pay."""
    xp = F.pad(x4, (padding[1], padding[1], padding[0], padding[0]))
    batch, channels = xp.shape[:2]
    per_row = (*kernel, channels) if channels_last else (channels, *kernel)
    out = xp.new_empty(batch, size[0], size[1], *per_row)
    source = xp.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) if channels_last else xp
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            _offset(out, i, j, channels_last).copy_(
                _window(source, i, j, stride, dilation, size).permute(0, 2, 3, 1))
    return out


def _scatter(rows: Tensor, x_shape, kernel, stride, dilation, padding, size,
             channels_last: bool) -> Tensor:
    """The adjoint of :func:`_gather`: each kernel offset's slice added into its window of a
    zero padded input, in kernel-offset order (as ``col2im`` adds them), the padding cut off."""
    batch, channels, height, width = x_shape
    per_row = (*kernel, channels) if channels_last else (channels, *kernel)
    g6 = rows.reshape(batch, size[0], size[1], *per_row)
    out = rows.new_zeros(batch, channels, height + 2 * padding[0], width + 2 * padding[1])
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            _window(out, i, j, stride, dilation, size).add_(
                _offset(g6, i, j, channels_last).permute(0, 3, 1, 2))
    return out[:, :, padding[0]:padding[0] + height, padding[1]:padding[1] + width]


def im2col(x4: Tensor, kernel, stride, dilation, padding, size) -> Tensor:
    """``F.unfold``'s columns as rows (B * L, C * kh * kw), in its order, for any dtype (int8
    included): one copy of a channels-last slice per kernel offset, several times faster than
    unfold and a transpose for the layers of the benchmarks (:class:`Unfold` differentiates
    it)."""
    out = _gather(x4, kernel, stride, dilation, padding, size, channels_last=False)
    return out.reshape(-1, out.shape[3] * kernel[0] * kernel[1])


def fold_rows(rows: Tensor, x_shape, kernel, stride, dilation, padding, size) -> Tensor:
    """The adjoint of :func:`im2col` (``F.fold`` of the rows' columns): each kernel offset's
    slice added into its window of a zero padded input, then the padding cut off. For each
    input value the contributions are added in kernel-offset order, as ``col2im`` adds them."""
    return _scatter(rows, x_shape, kernel, stride, dilation, padding, size, channels_last=False)


def im2col_channels_last(x4: Tensor, kernel, stride, dilation, padding, size) -> Tensor:
    """:func:`im2col`'s windows as ``(B * L, kh * kw, C)``: each kernel offset's
    ``(B, *size, C)`` slice copied whole (contiguous writes). A depthwise convolution's
    operands as the grouped kernel takes them (:mod:`brevitas_a2q.sim.grouped`), without a
    transposed copy."""
    out = _gather(x4, kernel, stride, dilation, padding, size, channels_last=True)
    return out.reshape(-1, kernel[0] * kernel[1], out.shape[-1])


def fold_channels_last(rows: Tensor, x_shape, kernel, stride, dilation, padding, size) -> Tensor:
    """The adjoint of :func:`im2col_channels_last`, as :func:`fold_rows` is of :func:`im2col`
    (the contributions to each input value added in kernel-offset order)."""
    return _scatter(rows, x_shape, kernel, stride, dilation, padding, size, channels_last=True)


class Unfold(torch.autograd.Function):
    """``F.unfold``'s columns as rows, differentiable: forward :func:`im2col`, backward its
    adjoint :func:`fold_rows`. Unlike ``F.unfold`` and a transposed copy, it makes one
    (B * L, K) array in the forward pass and none in the backward pass."""

    @staticmethod
    def forward(ctx, x4, kernel, stride, dilation, padding, size):
        """:func:`im2col`."""
        ctx.geometry = (x4.shape, kernel, stride, dilation, padding, size)
        return im2col(x4, kernel, stride, dilation, padding, size)

    @staticmethod
    def backward(ctx, g):
        """:func:`fold_rows` of the rows' gradient."""
        return fold_rows(g, *ctx.geometry), None, None, None, None, None
