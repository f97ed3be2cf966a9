"""Sub-pixel convolutions (``Conv -> DepthToSpace``, ESPCN's ``PixelShuffle``) as transposed
convolutions FINN can build, with the accumulator records following them.

FINN has no DepthToSpace layer. qonnx's ``SubPixelToDeconvolution`` rewrites a same-padded
convolution with ``C * r^2`` output channels followed by ``DepthToSpace(r)`` (mode CRD, PyTorch's
``PixelShuffle``) into one ``ConvTranspose`` with ``C`` output channels, stride ``r`` and kernel
``k * r`` (the weight shuffle of Colbert et al., "An Energy-Efficient Edge Computing Paradigm for
Convolution-Based Image Upsampling", 2021); the result is exact. FINN then lowers the transposed
convolution to pixel padding and a stride-1 convolution (``InferPixelPaddingDeconv``).

Output channel ``c`` of the transposed convolution holds the weights of the ``r^2`` sub-pixel
channels ``c r^2 .. c r^2 + r^2 - 1``, one per kernel-position class ``(kh mod r, kw mod r)``; at any
output pixel only one class meets non-zero (non-padding) inputs, so one accumulator sums exactly one
sub-pixel channel's products. :class:`SubPixelToTransposedConv` therefore rewrites the layer's record
for the new node (the union fingerprint) and keeps the fingerprints of the ``r^2`` column groups;
:func:`column_groups` finds the groups again in any later node from those fingerprints (a layout it
cannot prove is refused, never guessed), and the range and the A2Q bound are taken per group.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation
from qonnx.util.basic import get_by_name

from brevitas_a2q.analysis.records import AccumulatorRecord, read_records, weight_fingerprint, write_records
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.quant.bounds import exact_accumulator_range

__all__ = [
    "COLUMN_GROUPS_KEY",
    "SubPixelToTransposedConv",
    "column_groups",
    "grouped_range",
    "read_column_groups",
    "restrict_to_groups",
    "step_a2q_subpixel_to_deconv",
    "write_column_groups",
]

# graph metadata: {node name: [[column, ...], ...]} for nodes whose accumulators sum one group at a time
COLUMN_GROUPS_KEY = "brevitas_a2q.column_groups"
SUBPIXEL = "subpixel"


def _attr(node, name: str, default=None):
    attr = get_by_name(node.attribute, name)
    if attr is None:
        return default
    return attr.s.decode() if attr.type == attr.STRING else (list(attr.ints) or attr.i)


def _subpixel_pairs(model: ModelWrapper) -> list[tuple[object, object]]:
    """Every ``(Conv, DepthToSpace)`` pair where the Conv's only consumer is the DepthToSpace."""
    pairs = []
    for node in model.graph.node:
        if node.op_type != "DepthToSpace":
            continue
        conv = model.find_producer(node.input[0])
        if conv is not None and conv.op_type == "Conv":
            pairs.append((conv, node))
    return pairs


def _weight_quant(model: ModelWrapper, conv):
    """The Quant node behind the Conv's weight, or None for an initializer."""
    producer = model.find_producer(conv.input[1])
    return producer if producer is not None and producer.op_type == "Quant" else None


def _refuse(conv, d2s, why: str, fix: str) -> A2QInputError:
    return A2QInputError(f"sub-pixel convolution {conv.name!r} -> {d2s.name!r}: {why}, so it cannot "
                         f"become a transposed convolution for FINN. {fix}")


def _check_convertible(model: ModelWrapper, conv, d2s) -> None:
    """Refuse, by name and with the fix, what qonnx's rewrite would skip or get wrong."""
    if _attr(d2s, "mode", "DCR") != "CRD":
        raise _refuse(conv, d2s, "DepthToSpace mode is DCR", "Use PixelShuffle (mode CRD).")
    if len(model.find_consumers(conv.output[0])) != 1:
        raise _refuse(conv, d2s, "the convolution has more consumers than the DepthToSpace",
                      "Give the convolution's output to the pixel shuffle alone.")
    if len(conv.input) == 3:
        raise _refuse(conv, d2s, "the convolution has a bias (it would have to be shuffled)",
                      "Build the layer with bias=False, as Brevitas's ESPCN does.")
    if _attr(conv, "group", 1) != 1:
        raise _refuse(conv, d2s, "the convolution is grouped", "Use groups=1.")
    if any(d != 1 for d in _attr(conv, "dilations", [1, 1])):
        raise _refuse(conv, d2s, "the convolution is dilated", "Use dilation=1.")
    kernel = _attr(conv, "kernel_shape")
    if kernel is None or len(kernel) != 2 or kernel[0] != kernel[1]:
        raise _refuse(conv, d2s, f"kernel {kernel} is not a square 2D kernel", "Use a square kernel.")
    quant = _weight_quant(model, conv)
    if quant is not None and np.asarray(model.get_initializer(quant.input[1])).size != 1:
        raise _refuse(conv, d2s, "its weight scale is per output channel (the r^2 sub-pixel "
                      "channels of one output channel would need one scale)",
                      "Quantize that layer's weights per tensor (weight_scaling_per_output_channel="
                      "False), as Brevitas's ESPCN does.")
    in_shape = model.get_tensor_shape(conv.input[0])
    out_shape = model.get_tensor_shape(conv.output[0])
    if in_shape is None or out_shape is None or in_shape[2:] != out_shape[2:]:
        raise _refuse(conv, d2s, "the convolution is not same-padded with stride 1",
                      "Use stride 1 and padding (k - 1) / 2.")


def _integer_weights(model: ModelWrapper, conv) -> np.ndarray:
    """The Conv's integer weights ``(out, in, k, k)`` (a Quant node's value / scale)."""
    quant = _weight_quant(model, conv)
    if quant is None:
        return np.asarray(model.get_initializer(conv.input[1]), dtype=np.float64)
    values = np.asarray(model.get_initializer(quant.input[0]), dtype=np.float64)
    return np.rint(values / np.asarray(model.get_initializer(quant.input[1]), dtype=np.float64))


def _group_fingerprints(q: np.ndarray, block: int) -> list[str]:
    """Fingerprint of each sub-pixel class: rows ``c`` hold channel ``c r^2 + g`` of ``q``."""
    return sorted(weight_fingerprint(q[g::block * block]) for g in range(block * block))


def _followed(record: AccumulatorRecord, conv, deconv, q: np.ndarray, block: int,
              deconv_rows: np.ndarray) -> AccumulatorRecord:
    """``record`` (of the sub-pixel Conv) rewritten for the transposed convolution that replaced it."""
    out, k_sub = q.shape[0] // block**2, int(np.prod(q.shape[1:]))
    union = q.reshape(out, block * block * k_sub)
    fingerprint = weight_fingerprint(deconv_rows)
    if fingerprint != weight_fingerprint(union):  # qonnx's shuffle moved weights between channels
        raise A2QInputError(f"sub-pixel convolution {conv.name!r}: the transposed convolution's "
                            "channels are not the unions of the sub-pixel channels; not converted")
    subpixel = {"block_size": block, "kernel": int(q.shape[2]), "in_channels": int(q.shape[1]),
                "source_node": conv.name, "source_fingerprint": record.fingerprint,
                "source_out_channels": int(q.shape[0]), "group_dot_length": k_sub,
                "group_fingerprints": _group_fingerprints(q, block)}
    return dataclasses.replace(record, node=deconv.name, op_type="ConvTranspose",
                               output=deconv.output[0], out_channels=out,
                               dot_length=block * block * k_sub, fingerprint=fingerprint,
                               extra={**record.extra, SUBPIXEL: subpixel})


class SubPixelToTransposedConv(Transformation):
    """Every sub-pixel convolution (``Conv -> DepthToSpace``) as a ``ConvTranspose`` (qonnx's
    ``SubPixelToDeconvolution``, exact), its accumulator record rewritten to match the new node
    (see the module docstring). Refuses by name what cannot be converted exactly: a bias, a
    per-channel weight scale, groups, dilation, mode DCR, a non-square kernel, other padding."""

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        from qonnx.transformation.subpixel_to_deconv import SubPixelToDeconvolution

        pairs = _subpixel_pairs(model)
        if not pairs:
            return model, False
        records = read_records(model)
        pending = []
        for conv, d2s in pairs:
            _check_convertible(model, conv, d2s)
            q = _integer_weights(model, conv)
            fingerprint = weight_fingerprint(q)
            index = next((i for i, r in enumerate(records) if r.fingerprint == fingerprint), None)
            pending.append((conv, d2s.output[0], _attr(d2s, "blocksize"), q, index))
        model = model.transform(SubPixelToDeconvolution())
        for conv, output, block, q, index in pending:
            deconv = model.find_producer(output)
            if deconv is None or deconv.op_type != "ConvTranspose":
                raise A2QInputError(f"sub-pixel convolution {conv.name!r}: qonnx's "
                                    "SubPixelToDeconvolution did not convert it")
            if index is not None:
                w = _integer_weights(model, deconv)  # (in, out, k r, k r)
                rows = w.transpose(1, 0, 2, 3).reshape(w.shape[1], -1)
                records[index] = _followed(records[index], conv, deconv, q, block, rows)
        if records:
            write_records(model, records)
        return model, False


def step_a2q_subpixel_to_deconv(model: ModelWrapper, cfg) -> ModelWrapper:
    """FINN build step (first, before ``step_qonnx_to_finn``): :class:`SubPixelToTransposedConv`."""
    return model.transform(SubPixelToTransposedConv())


def _column_positions(layout: str, shape: tuple[int, int, int], block: int) -> np.ndarray:
    """Sub-pixel class ``(kh mod r) r + (kw mod r)`` of every column of a weight row laid out as
    ``"ckk"`` (ONNX ConvTranspose: in, kh, kw) or ``"kkc"`` (FINN's im2col: kh, kw, in)."""
    channels, kh, kw = shape
    h, w = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    cls = (h % block) * block + (w % block)  # (kh, kw)
    if layout == "ckk":
        return np.broadcast_to(cls, (channels, kh, kw)).reshape(-1)
    return np.repeat(cls.reshape(-1), channels)


def column_groups(q: np.ndarray, record: AccumulatorRecord | None) -> list[np.ndarray] | None:
    """For a node whose weight rows ``q`` (``(out, K)``) come from a sub-pixel convolution: the
    column indices of each sub-pixel class. Each known layout (ONNX's ``(in, kh, kw)``, FINN's
    im2col ``(kh, kw, in)``) is tried and accepted only if its groups' fingerprints are exactly the
    record's, a proof that each group is one sub-pixel channel per row. None for other layers;
    raises where no layout proves it."""
    info = (record.extra or {}).get(SUBPIXEL) if record is not None else None
    if info is None:
        return None
    block, kernel, channels = int(info["block_size"]), int(info["kernel"]), int(info["in_channels"])
    shape = (channels, kernel * block, kernel * block)
    if q.shape[1] != int(np.prod(shape)):
        raise A2QInputError(f"layer {record.layer!r}: a node with {q.shape[1]} weights per channel "
                            f"cannot be its sub-pixel transposed convolution ({np.prod(shape)})")
    for layout in ("ckk", "kkc"):
        cls = _column_positions(layout, shape, block)
        groups = [np.flatnonzero(cls == g) for g in range(block * block)]
        if sorted(weight_fingerprint(q[:, g]) for g in groups) == info["group_fingerprints"]:
            return groups
    raise A2QInputError(f"layer {record.layer!r}: the node's weights are the sub-pixel channels' "
                        "unions, but in no weight layout this package knows; its accumulator "
                        "cannot be proven per sub-pixel channel")


def restrict_to_groups(q: np.ndarray, x_max: np.ndarray, x_min: np.ndarray,
                       groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Extreme input vectors (``(out, K)``, see :func:`finn_flow.verify.hls_arith.extreme_vectors`)
    that the node can really see: per output channel, non-zero only on the column group that
    reaches the channel's largest (smallest) dot product, zero (pixel padding) elsewhere."""
    def pick(x: np.ndarray, best) -> np.ndarray:
        sums = np.stack([(x[:, g] * q[:, g]).sum(axis=1) for g in groups])  # (groups, out)
        chosen = best(sums, axis=0)
        out = np.zeros_like(x)
        for index, g in enumerate(groups):
            rows = chosen == index
            out[np.ix_(rows, g)] = x[np.ix_(rows, g)]
        return out

    return pick(x_max, np.argmax), pick(x_min, np.argmin)


def grouped_range(q: np.ndarray, groups: list[np.ndarray], low: int, high: int) -> tuple[int, int]:
    """Exact accumulator range of a node that sums one column group at a time (zeros elsewhere):
    the union over groups of each group's exact range (A2Q's exact range, per group)."""
    if low > 0 or high < 0:
        raise A2QInputError(f"inputs in [{low}, {high}] exclude the zero of pixel padding")
    ranges = [exact_accumulator_range(q[:, g], low, high).overall for g in groups]
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def write_column_groups(model: ModelWrapper, groups: dict[str, list[np.ndarray]]) -> None:
    """Store per-node column groups in the graph metadata (for the verification's extremes)."""
    payload = {name: [g.tolist() for g in node_groups] for name, node_groups in groups.items()}
    model.set_metadata_prop(COLUMN_GROUPS_KEY, json.dumps(payload, sort_keys=True))


def read_column_groups(model: ModelWrapper) -> dict[str, list[np.ndarray]]:
    """The column groups :func:`write_column_groups` stored (empty if none)."""
    raw = model.get_metadata_prop(COLUMN_GROUPS_KEY)
    if not raw:
        return {}
    return {name: [np.asarray(g, dtype=np.int64) for g in groups]
            for name, groups in json.loads(raw).items()}
