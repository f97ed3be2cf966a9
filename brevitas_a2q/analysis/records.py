"""The accumulator records a QONNX file carries: one per accumulating layer.

Format (``brevitas_a2q.accumulators/1``): the graph metadata property ``brevitas_a2q.accumulators``
(``ModelWrapper.set_metadata_prop``) holds a JSON object ``{"format": ..., "layers": [record, ...]}``.
Each record (:class:`AccumulatorRecord`) names the Brevitas layer, the node and tensors it became at
export, its variant and target accumulator width, and a fingerprint of its integer weights.

Graph passes (qonnx cleanup, FINN's lowering and streamlining) rename nodes and tensors but keep
graph metadata and keep each output channel's integer weights (up to a permutation of the
dot-product axis, e.g. im2col order). :func:`weight_fingerprint` is invariant to exactly that, so a
record is found again from the weights of any node it turned into.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

METADATA_KEY = "brevitas_a2q.accumulators"
FORMAT = "brevitas_a2q.accumulators/1"
VARIANTS = ("a2q", "a2q+", "none")

__all__ = [
    "FORMAT",
    "METADATA_KEY",
    "AccumulatorRecord",
    "read_records",
    "weight_fingerprint",
    "write_records",
]


def weight_fingerprint(int_weights: np.ndarray) -> str:
    """SHA-1 of the per-output-channel *sorted* integer weights (rows = output channels).

    Invariant to reordering within a channel (PyTorch's ``(C, kh, kw)`` vs FINN's ``(kh, kw, C)``),
    sensitive to anything that changes a channel's multiset of integers.
    """
    q = np.asarray(int_weights)
    q = q.reshape(q.shape[0], -1)
    if q.dtype.kind not in "iu":
        q = np.rint(q)
    q = q.astype(np.int64, copy=False)
    if q.size and -(2**15) <= q.min() and q.max() < 2**15:  # same order, 16-bit radix sort
        q = np.sort(q.astype(np.int16), axis=1, kind="stable").astype(np.int64)
    else:
        q = np.sort(q, axis=1)
    digest = hashlib.sha1(str(q.shape).encode())
    digest.update(np.ascontiguousarray(q).tobytes())
    return digest.hexdigest()


@dataclass
class AccumulatorRecord:
    """One accumulating layer (MatMul/Gemm/Conv/ConvTranspose fed by a quantized weight) of an
    exported model."""

    layer: str  # Brevitas module name, e.g. "features.3"
    node: str  # ONNX node name at export time
    op_type: str  # MatMul, Gemm, Conv or ConvTranspose at export time
    weight: str  # weight tensor name at export time (the initializer behind the weight Quant node)
    output: str  # accumulator output tensor name at export time
    variant: str  # "a2q", "a2q+" or "none"
    target_bits: int | None  # P the layer was trained for (None: no accumulator constraint)
    input_bits: int | None  # N (None: a float input, only for a layer without a target)
    input_signed: bool | None
    weight_bits: int  # M
    out_channels: int
    dot_length: int  # K = in_channels / groups * prod(kernel)
    fingerprint: str  # weight_fingerprint of the integer weights, shape (out_channels, K)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"layer {self.layer!r}: variant must be one of {VARIANTS}, "
                             f"got {self.variant!r}")

    @property
    def zero_centered(self) -> bool:
        return self.variant == "a2q+"


def write_records(model, records: list[AccumulatorRecord]) -> None:
    """Store ``records`` in a qonnx ``ModelWrapper``'s graph metadata (replacing earlier ones)."""
    payload = {"format": FORMAT, "layers": [asdict(r) for r in records]}
    model.set_metadata_prop(METADATA_KEY, json.dumps(payload, sort_keys=True))


def read_records(model) -> list[AccumulatorRecord]:
    """Records stored in a qonnx ``ModelWrapper`` (empty if the model carries none)."""
    raw = model.get_metadata_prop(METADATA_KEY)
    if raw is None:
        return []
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"metadata {METADATA_KEY!r} is not valid JSON: {err}") from err
    if payload.get("format") != FORMAT:
        raise ValueError(f"metadata {METADATA_KEY!r} has format {payload.get('format')!r}, "
                         f"this version reads {FORMAT!r}")
    return [AccumulatorRecord(**entry) for entry in payload["layers"]]
