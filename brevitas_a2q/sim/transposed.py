"""Transposed convolutions under a simulated accumulator, as the direct convolutions that
compute them: :class:`DirectConv`.

A transposed convolution (``QuantConvTranspose1d/2d``: a UNet's or a decoder's upsampling) with
stride ``s``, padding ``p``, output padding ``q``, dilation ``d`` and kernel ``k`` is the direct
convolution, stride 1 and dilation ``d``, of its input with ``s - 1`` zeros inserted between
neighbouring elements and ``d (k - 1) - p`` zeros around it (``q`` more at the end; a negative
amount crops), by the kernel flipped along every spatial axis with each group's input and output
channels swapped (Dumoulin & Visin, "A guide to convolution arithmetic for deep learning",
arXiv:1603.07285, Sec. 4). That is how FINN computes one (``InferPixelPaddingDeconv``: zero
insertion, then a convolution), and it gives each output's products an order for the
accumulation chain: that of the direct convolution (input channel, then kernel row, then column
of the flipped kernel). The inserted zeros' products change no accumulator and have no event;
they are counted among the additions, as the hardware performs them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from brevitas.nn import QuantConvTranspose1d, QuantConvTranspose2d
from torch import Tensor, nn

TRANSPOSED_TYPES = (QuantConvTranspose1d, QuantConvTranspose2d)


class DirectConv(NamedTuple):
    """The geometry of the direct convolution that computes a transposed one (the attributes
    of a ``QuantConv1d/2d`` that :mod:`.layers` and :mod:`.unfold` read), over the input that
    :meth:`stuff` makes, with :func:`direct_weight` of its weight as its own."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    in_channels: int
    out_channels: int
    weight: Tensor  # the direct convolution's: (out_channels, in_channels/groups, *kernel)
    inserted: tuple[int, ...]  # the transposed convolution's stride: zeros between inputs
    pads: tuple[tuple[int, int], ...]  # zeros before and after each spatial axis (< 0: crop)

    @classmethod
    def of(cls, layer: nn.Module, x: Tensor, weight: Tensor) -> DirectConv:
        """The direct convolution of ``layer`` (a QuantConvTranspose1d/2d) on input ``x`` with
        its quantized weight ``weight``. Consumes the ``output_size`` given to the layer's
        forward, as Brevitas's own ``inner_forward_impl`` does."""
        output_padding = layer.compute_output_padding(x, layer._output_size)
        layer._output_size = None
        dims = len(layer.kernel_size)
        pads = []
        for i in range(dims):
            before = layer.dilation[i] * (layer.kernel_size[i] - 1) - layer.padding[i]
            pads.append((before, before + output_padding[i]))
        return cls(tuple(layer.kernel_size), (1,) * dims, (0,) * dims, tuple(layer.dilation),
                   layer.groups, layer.in_channels, layer.out_channels,
                   direct_weight(weight, layer.groups), tuple(layer.stride), tuple(pads))

    def stuff(self, x: Tensor) -> Tensor:
        """``x`` ``(B, C, *L)`` with the inserted zeros and the padding: the direct convolution's
        input (differentiable; any dtype), in one new array (a negative padding crops it)."""
        spread = [(n - 1) * s + 1 for n, s in zip(x.shape[2:], self.inserted, strict=True)]
        size = [max(before, 0) + n + max(after, 0)
                for n, (before, after) in zip(spread, self.pads, strict=True)]
        out = x.new_zeros(*x.shape[:2], *size)
        out[(slice(None), slice(None)) + tuple(
            slice(max(before, 0), max(before, 0) + n, s)
            for n, s, (before, _) in zip(spread, self.inserted, self.pads, strict=True))] = x
        return out[(slice(None), slice(None)) + tuple(
            slice(max(-before, 0), m - max(-after, 0))
            for m, (before, after) in zip(size, self.pads, strict=True))]

    def conv(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        """The direct convolution of the stuffed ``x`` by ``w`` (the exact layer, for
        wraparound, where the order of additions plays no part)."""
        conv = F.conv1d if len(self.kernel_size) == 1 else F.conv2d
        return conv(x, w, bias, 1, 0, self.dilation, self.groups)


def direct_weight(w: Tensor, groups: int) -> Tensor:
    """A transposed convolution's weight ``(C_in, C_out/groups, *k)`` as the direct
    convolution's ``(C_out, C_in/groups, *k)``: each group's channels swapped, the kernel flipped."""
    c_in, o_group, *kernel = w.shape
    swapped = w.reshape(groups, c_in // groups, o_group, *kernel).transpose(1, 2)
    return swapped.reshape(groups * o_group, c_in // groups, *kernel) \
        .flip(list(range(2, 2 + len(kernel))))


def direct_output_scale(scale: Tensor, w: Tensor, groups: int) -> Tensor | None:
    """A transposed convolution's weight scale (any shape that broadcasts over its weight
    ``w``) as one scale per output channel (C_out,), or None where it is not constant over
    each output channel's weights."""
    rows = direct_weight(scale.expand_as(w), groups).flatten(1)
    return rows[:, 0] if bool((rows == rows[:, :1]).all()) else None
