"""Per-layer accumulator widths for FINN's MVAU/VVAU nodes, proven from the A2Q bound.

FINN's ``MinimizeAccumulatorWidth`` sizes each accumulator from the exact range of its integer
weights; it knows nothing of the width a layer was *trained* for. This pass finds, for every
MVAU/VVAU, the Brevitas layer it came from (the export records of :mod:`brevitas_a2q.analysis.records`,
matched by :func:`~brevitas_a2q.analysis.records.weight_fingerprint` of the node's integer weights), and

* computes the widths implied by the A2Q/A2Q+ L1 bound (Colbert et al. 2023, Eq. 15; 2024,
  Eq. 18), by the exact range (:func:`brevitas_a2q.quant.bounds.exact_accumulator_range`, the same
  definition as qonnx's ``calculate_matvec_accumulator_range``) and by the data types alone;
* refuses a layer whose exact range does not fit its target ``P`` (it would overflow);
* sets the accumulator to the tightest proven width and keeps the thresholds consistent with it.

In finn-hlslib's MVAU/VVAU the hardware accumulator has the thresholds' type (``TA``), or the output
type for a layer without activation, so both are set together with ``accDataType``: thresholds are
rounded up and clipped to ``[lo, hi + 1]`` of the exact accumulator range (which changes no output:
the accumulator never leaves ``[lo, hi]``) and typed with the accumulator's type. A threshold type
narrower than the accumulator truncated sums in FINN (Xilinx/finn#1561); here they are one type.

Only qonnx and numpy are needed: the pass runs on FINN-format graphs without FINN installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from onnx import helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation

from brevitas_a2q.analysis.records import (
    AccumulatorRecord,
    channel_set_fingerprint,
    weight_fingerprint,
)
from brevitas_a2q.errors import A2QInputError, AccumulatorOverflowError
from brevitas_a2q.quant.bounds import (
    datatype_accumulator_bits,
    exact_accumulator_range,
    min_accumulator_bits,
    zero_centered_l1_norm,
)
from finn_flow.steps.subpixel import column_groups, grouped_range, write_column_groups

__all__ = [
    "FINN_DOMAIN",
    "LayerWidths",
    "SetProvenAccumulatorWidths",
    "accumulating_nodes",
    "integer_weights",
    "range_datatype",
]

FINN_DOMAIN = "finn.custom_op.fpgadataflow"
ACCUMULATING_OPS = ("MVAU", "VVAU")

# (node, model) -> LUT estimate of the node as configured
LutEstimator = Callable[[object, ModelWrapper], int]


@dataclass
class LayerWidths:
    """What the pass found and did for one MVAU/VVAU node (one row of ``accumulators.json``)."""

    finn_node: str
    op_type: str
    layer: str | None  # Brevitas layer (None: no record matched)
    variant: str | None
    target_bits: int | None  # P
    input_datatype: str
    weight_datatype: str
    dot_length: int  # K
    out_channels: int
    range_min: int
    range_max: int
    bits_exact: int  # tightest type holding the exact range (unsigned when it cannot be negative)
    bits_l1_bound: int | None  # smallest P the A2Q/A2Q+ bound admits for these weights
    bits_datatype: int  # from data types alone (A2Q Eq. 12)
    finn_datatype: str  # FINN's accDataType before this pass
    datatype: str  # the accumulator (and threshold / pass-through output) type set
    forced: bool = False  # width imposed by the user, not proven
    lut_chosen: int | None = None
    lut_finn: int | None = None
    lut_int32: int | None = None
    lut_int32_uncapped: int | None = None  # FINN's formula at 32 bits without its cap
    extra: dict = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return DataType[self.datatype].bitwidth()

    @property
    def finn_bits(self) -> int:
        return DataType[self.finn_datatype].bitwidth()

    @property
    def holds_exact_range(self) -> bool:
        """Whether the width set holds the exact accumulator range (always, unless forced)."""
        dt = DataType[self.datatype]
        return int(dt.min()) <= self.range_min and self.range_max <= int(dt.max())

    @property
    def within_target(self) -> bool | None:
        return None if self.target_bits is None else self.bits <= self.target_bits

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(bits=self.bits, finn_bits=self.finn_bits, within_target=self.within_target,
                   holds_exact_range=self.holds_exact_range)
        return out


def accumulating_nodes(model: ModelWrapper) -> list:
    """FINN MVAU/VVAU nodes (generic or specialized ``_hls``/``_rtl``) of ``model``, in order."""
    return [n for n in model.graph.node
            if n.domain.startswith(FINN_DOMAIN) and n.op_type.split("_")[0] in ACCUMULATING_OPS]


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node, name: str, value) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _str_attr(node, name: str, default: str) -> str:
    value = _attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def integer_weights(model: ModelWrapper, node) -> np.ndarray:
    """The node's integer weights as ``(out_channels, K)``: MVAU stores ``(MW, MH)`` = ``(K, out)``,
    VVAU ``(channels, 1, k_h, k_w)``. Bipolar (``binaryXnorMode``) weights are mapped to +-1."""
    weights = model.get_initializer(node.input[1])
    if weights is None:
        raise A2QInputError(f"FINN node {node.name!r} has no weight initializer "
                            "(runtime weights are not supported)")
    weights = np.asarray(weights, dtype=np.float64)
    if _attr(node, "binaryXnorMode", 0):
        weights = 2 * weights - 1
    if node.op_type.startswith("MVAU"):
        return weights.T
    return weights.reshape(weights.shape[0], -1)


def range_datatype(minimum: int, maximum: int) -> DataType:
    """Tightest integer type holding ``[minimum, maximum]``: ``UINTb`` when nothing is negative
    (as FINN does), else ``INTb``."""
    if minimum >= 0:
        return DataType[f"UINT{max(int(maximum).bit_length(), 1)}"]
    bits = 1
    while not (-(2 ** (bits - 1)) <= minimum and maximum <= 2 ** (bits - 1) - 1):
        bits += 1
    return DataType[f"INT{bits}"]


def _find_record(records: Sequence[AccumulatorRecord], q: np.ndarray,
                 used: Sequence[AccumulatorRecord] = ()) -> tuple[AccumulatorRecord | None, bool]:
    """The record of the layer whose integer weights are ``q`` (by
    :func:`~brevitas_a2q.analysis.records.weight_fingerprint`), else of the layer whose channels
    ``q`` holds in another order (an exact transformation permuted them); and whether permuted.
    Among layers with identical weights (e.g. several rounded to all zeros), the first one not in
    ``used`` (the records already matched, in graph order)."""
    def first(matches: list[AccumulatorRecord]) -> AccumulatorRecord:
        return next((r for r in matches if not any(r is u for u in used)), matches[0])

    fingerprint = weight_fingerprint(q)
    matches = [r for r in records if r.fingerprint == fingerprint]
    if matches:
        return first(matches), False
    channels = channel_set_fingerprint(q)
    matches = [r for r in records if r.extra.get("channel_set_fingerprint") == channels]
    return (first(matches), True) if matches else (None, False)


def _l1_bits(q: np.ndarray, idt: DataType, record: AccumulatorRecord | None) -> int | None:
    """Smallest P the A2Q (or, for zero-centred A2Q+ layers, A2Q+) bound admits for ``q``."""
    if not idt.is_integer():
        return None
    n_bits, signed = idt.bitwidth(), idt.signed()
    if record is not None and record.zero_centered:
        return max(min_accumulator_bits(l1, n_bits, signed, zero_centered=True)
                   for l1 in zero_centered_l1_norm(q))
    l1 = int(np.abs(q).sum(axis=1).max()) if q.size else 0
    return min_accumulator_bits(l1, n_bits, signed)


class SetProvenAccumulatorWidths(Transformation):
    """Set every MVAU/VVAU accumulator to its tightest proven width, checked against the target
    accumulator width recorded at export (see the module docstring).

    ``records``: accumulator records of the exported model
    (:func:`brevitas_a2q.analysis.records.read_records`).
    ``force_bits``: impose this signed width on every node instead (unsafe, for demonstrating that a
    model without the A2Q guarantee overflows); the target check is skipped for it.
    ``require_records``: fail if a node matches no record (when the model carries records).
    ``lut_estimator``: optional ``(node, model) -> LUTs``, called at FINN's width, at the width set
    and at INT32. After :meth:`apply`, :attr:`layers` holds one :class:`LayerWidths` per node.
    """

    def __init__(
        self,
        records: Sequence[AccumulatorRecord],
        force_bits: int | None = None,
        require_records: bool = True,
        lut_estimator: LutEstimator | None = None,
    ) -> None:
        super().__init__()
        self.records = list(records)
        self.force_bits = force_bits
        self.require_records = require_records and bool(self.records)
        self.lut_estimator = lut_estimator
        self.layers: list[LayerWidths] = []

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        self._matched: list[AccumulatorRecord] = []
        self.column_groups: dict[str, list[np.ndarray]] = {}
        self.layers = [self._apply_node(model, node) for node in accumulating_nodes(model)]
        if self.column_groups:
            write_column_groups(model, self.column_groups)
        return model, False

    def _apply_node(self, model: ModelWrapper, node) -> LayerWidths:
        q = integer_weights(model, node)
        if not np.array_equal(q, np.round(q)):
            raise A2QInputError(f"FINN node {node.name!r} has non-integer weights; run FINN's "
                                "streamlining before setting accumulator widths")
        idt = DataType[_str_attr(node, "inputDataType", "")]
        if not idt.is_integer():
            raise A2QInputError(f"FINN node {node.name!r}: input type {idt.name} is not integer")
        wdt = model.get_tensor_datatype(node.input[1])
        record, permuted = _find_record(self.records, q, self._matched)
        if record is not None:
            self._matched.append(record)
        if record is None and self.require_records:
            raise A2QInputError(
                f"FINN node {node.name!r} ({q.shape[0]}x{q.shape[1]} weights) matches no "
                "accumulator record of the exported model: its integer weights changed between "
                "export and FINN (an unsupported graph transformation), or the records belong "
                "to another model")
        groups = column_groups(q, record)
        if groups is None:
            lo, hi = exact_accumulator_range(q, int(idt.min()), int(idt.max())).overall
            l1_bits, dot_length = _l1_bits(q, idt, record), q.shape[1]
        else:  # one sub-pixel channel's products at a time (finn_flow.steps.subpixel)
            lo, hi = grouped_range(q, groups, int(idt.min()), int(idt.max()))
            l1_bits = max(_l1_bits(q[:, g], idt, record) for g in groups)
            dot_length = len(groups[0])
            self.column_groups[node.name] = groups
        exact = range_datatype(lo, hi)
        finn_dt = _str_attr(node, "accDataType", "INT32")
        widths = LayerWidths(
            finn_node=node.name, op_type=node.op_type,
            layer=record.layer if record else None, variant=record.variant if record else None,
            target_bits=record.target_bits if record else None,
            input_datatype=idt.name, weight_datatype=wdt.name,
            dot_length=dot_length, out_channels=q.shape[0], range_min=lo, range_max=hi,
            bits_exact=exact.bitwidth(), bits_l1_bound=l1_bits,
            bits_datatype=datatype_accumulator_bits(dot_length, idt.bitwidth(),
                                                    max(wdt.bitwidth(), 1), idt.signed()),
            finn_datatype=finn_dt, datatype=finn_dt, forced=self.force_bits is not None,
            extra={} if groups is None else {"subpixel_groups": len(groups)},
        )
        if permuted:
            widths.extra["channels_permuted"] = True
        if self.lut_estimator is not None:
            widths.lut_finn = int(self.lut_estimator(node, model))
        if self.force_bits is None and widths.target_bits is not None \
                and exact.bitwidth() > widths.target_bits:
            raise AccumulatorOverflowError(
                f"layer {widths.layer!r} (FINN node {node.name!r}) needs a {exact.name} "
                f"accumulator for its exact range [{lo}, {hi}] with {idt.name} inputs, wider than "
                f"its target P = {widths.target_bits}: the model is not overflow-safe at that "
                f"width (FINN chose {finn_dt}). Retrain with A2Q at P = {widths.target_bits}, or "
                "export the layer with a wider target")
        datatype = self._set_datatype(model, node, lo, hi, exact)
        widths.datatype = datatype.name
        if self.lut_estimator is not None:
            widths.lut_chosen = int(self.lut_estimator(node, model))
            _set_attr(node, "accDataType", "INT32")
            widths.lut_int32 = int(self.lut_estimator(node, model))
            _set_attr(node, "accDataType", datatype.name)
        return widths

    def _set_datatype(self, model: ModelWrapper, node, lo: int, hi: int,
                      exact: DataType) -> DataType:
        """Set ``accDataType`` and the type the hardware accumulates in (thresholds, or the output
        of a layer without activation) to one type; return it."""
        no_activation = bool(_attr(node, "noActivation", 0))
        thresholds = None if no_activation or len(node.input) < 3 else model.get_initializer(
            node.input[2])
        if self.force_bits is not None:
            datatype = DataType[f"INT{self.force_bits}"]
            low, high = int(datatype.min()), int(datatype.max())
        else:
            datatype, low, high = exact, lo, hi + 1
        if thresholds is not None:
            clipped = np.clip(np.ceil(thresholds), low, high).astype(np.float32)
            if self.force_bits is None:
                datatype = range_datatype(min(lo, int(clipped.min())),
                                          max(hi, int(clipped.max())))
            model.set_initializer(node.input[2], clipped)
            model.set_tensor_datatype(node.input[2], datatype)
        _set_attr(node, "accDataType", datatype.name)
        if no_activation:
            _set_attr(node, "outputDataType", datatype.name)
            model.set_tensor_datatype(node.output[0], datatype)
        return datatype
