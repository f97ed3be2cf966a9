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
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from brevitas_a2q.errors import A2QInputError

METADATA_KEY = "brevitas_a2q.accumulators"
FORMAT = "brevitas_a2q.accumulators/1"
VARIANTS = ("a2q", "a2q+", "none")
TARGET_BITS_RANGE = (2, 64)  # the accumulator widths a target P may take (as the quantizers)
_FIX = ("re-export the model with brevitas_a2q.export.export_qonnx, or delete the metadata "
        f"property {METADATA_KEY!r} to analyze the file without its records")

__all__ = [
    "FORMAT",
    "METADATA_KEY",
    "AccumulatorRecord",
    "read_records",
    "weight_fingerprint",
    "channel_set_fingerprint",
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


def channel_set_fingerprint(int_weights: np.ndarray) -> str:
    """SHA-1 of the integer weights as a *set of channels*: each channel's sorted weights, the
    channels in lexicographic order. Invariant to any permutation of the output channels as well
    (an exact graph transformation may reorder them); stored in a record's ``extra`` under
    ``"channel_set_fingerprint"`` to match a layer whose channels were permuted."""
    q = np.asarray(int_weights)
    q = np.sort(np.rint(q.reshape(q.shape[0], -1)).astype(np.int64), axis=1)
    q = q[np.lexsort(q.T[::-1])] if q.size else q
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
            raise A2QInputError(f"layer {self.layer!r}: variant must be one of {VARIANTS}, "
                                f"got {self.variant!r}")

    @property
    def zero_centered(self) -> bool:
        return self.variant == "a2q+"


def write_records(model, records: list[AccumulatorRecord]) -> None:
    """Store ``records`` in a qonnx ``ModelWrapper``'s graph metadata (replacing earlier ones)."""
    payload = {"format": FORMAT, "layers": [asdict(r) for r in records]}
    model.set_metadata_prop(METADATA_KEY, json.dumps(payload, sort_keys=True))


def read_records(model, source: str | None = None) -> list[AccumulatorRecord]:
    """Records stored in a qonnx ``ModelWrapper`` (empty if the model carries none).

    Raises :class:`~brevitas_a2q.errors.A2QInputError` naming ``source`` (the file, if given),
    the record and the fix when the metadata is not JSON, has another format version, or a
    record lacks a field or holds a value of the wrong type or range (a target P outside
    :data:`TARGET_BITS_RANGE`, a negative width, ...): such a record cannot be checked, so
    nothing is reported as holding or violated."""
    where = f"{source}: " if source else ""
    raw = model.get_metadata_prop(METADATA_KEY)
    if raw is None:
        return []
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError as err:
        raise A2QInputError(f"{where}metadata {METADATA_KEY!r} is not valid JSON ({err}); "
                            f"{_FIX}") from None
    if not isinstance(payload, dict):
        raise A2QInputError(f"{where}metadata {METADATA_KEY!r} is a JSON "
                            f"{type(payload).__name__}, not an object with format {FORMAT!r}; "
                            f"{_FIX}")
    if payload.get("format") != FORMAT:
        raise A2QInputError(f"{where}metadata {METADATA_KEY!r} has format "
                            f"{payload.get('format')!r}; this version reads {FORMAT!r}: {_FIX}")
    layers = payload.get("layers")
    if not isinstance(layers, list):
        raise A2QInputError(f"{where}metadata {METADATA_KEY!r}: 'layers' must be a list of "
                            f"records, got {type(layers).__name__}; {_FIX}")
    return [_record(entry, f"{where}accumulator record {i}") for i, entry in enumerate(layers)]


# field -> (types it may hold, predicate on the value, what the predicate requires)
_TEXT = ((str,), lambda v: True, "a string")
_WHOLE = ((int,), lambda v: v >= 1, "a whole number of at least 1")
_CHECKS: dict[str, tuple] = {
    "layer": _TEXT, "node": _TEXT, "op_type": _TEXT, "weight": _TEXT, "output": _TEXT,
    "fingerprint": _TEXT,
    "variant": ((str,), lambda v: v in VARIANTS, f"one of {', '.join(VARIANTS)}"),
    "target_bits": ((int, type(None)),
                    lambda v: v is None or TARGET_BITS_RANGE[0] <= v <= TARGET_BITS_RANGE[1],
                    f"null or a whole number of bits from {TARGET_BITS_RANGE[0]} to "
                    f"{TARGET_BITS_RANGE[1]}"),
    "input_bits": ((int, type(None)), lambda v: v is None or v >= 1,
                   "null (a float input) or a whole number of at least 1"),
    "weight_bits": _WHOLE, "out_channels": _WHOLE, "dot_length": _WHOLE,
    "input_signed": ((bool, type(None)), lambda v: True, "true, false or null (a float input)"),
    "extra": ((dict,), lambda v: True, "an object"),
}


def _record(entry: object, where: str) -> AccumulatorRecord:
    """One record from its JSON object, every field checked (see :func:`read_records`)."""
    if not isinstance(entry, dict):
        raise A2QInputError(f"{where} is a {type(entry).__name__}, not an object; {_FIX}")
    where = f"{where} (layer {entry['layer']!r})" if isinstance(entry.get("layer"), str) else where
    required = {f.name for f in fields(AccumulatorRecord)} - {"extra"}
    missing = sorted(required - set(entry))
    unknown = sorted(set(entry) - set(_CHECKS))
    if missing or unknown:
        what = "; ".join(part for part in (missing and f"lacks {', '.join(missing)}",
                                           unknown and f"has unknown field(s) "
                                                       f"{', '.join(unknown)}") if part)
        raise A2QInputError(f"{where} {what}; {_FIX}")
    for name, value in entry.items():
        types, valid, requirement = _CHECKS[name]
        is_bool = isinstance(value, bool) and bool not in types  # JSON true is not a number
        if is_bool or not isinstance(value, types) or not valid(value):
            raise A2QInputError(f"{where}: {name} must be {requirement}, got {value!r}; {_FIX}")
    if entry["input_bits"] is None and entry["target_bits"] is not None:
        raise A2QInputError(f"{where}: a float input (input_bits null) cannot have a target "
                            f"(target_bits {entry['target_bits']}); {_FIX}")
    return AccumulatorRecord(**entry)
