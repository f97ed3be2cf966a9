"""FINN's LUT estimate of an accumulating layer at a chosen accumulator width, including widths
FINN's estimator caps.

FINN's HLS MVAU/VVAU ``lut_estimation`` (FINN-R cost model, Blott et al. 2018) charges the
accumulator, and with thresholds in LUTRAM the threshold memory and comparators, linearly in the
accumulator bits, but caps the bits at the data-type bound (A2Q Eq. 12): an ``INT32`` accumulator is
costed at 15-18 bits for W4A4 layers. :func:`lut_at_width` evaluates FINN's own method on a copy of
the node with ``accDataType`` set; :func:`uncapped_lut_estimate` extends FINN's formula past the cap:
it evaluates the method at every width from 2 bits up to the cap, checks that the estimates lie on a
line (up to FINN's rounding down to an integer), and extrapolates that line. FINN's code is called,
never changed.
"""

from __future__ import annotations

import copy

import numpy as np
from onnx import helper

from finn_flow.finn_compat import lut_estimation

__all__ = ["DEFAULT_FPGA_PART", "lut_at_width", "lut_estimate", "uncapped_lut_estimate"]

DEFAULT_FPGA_PART = "xc7z020clg400-1"  # Pynq-Z1, FINN's default board here


def lut_estimate(node, fpgapart: str = DEFAULT_FPGA_PART) -> int:
    """FINN's ``lut_estimation`` of ``node`` as configured, for ``fpgapart`` (0 for layers
    without one)."""
    from qonnx.custom_op.registry import getCustomOp

    inst = getCustomOp(node)
    return lut_estimation(inst, fpgapart) if hasattr(inst, "lut_estimation") else 0


def lut_at_width(node, bits: int, signed: bool = True, fpgapart: str = DEFAULT_FPGA_PART) -> int:
    """FINN's LUT estimate of a copy of ``node`` with ``accDataType`` ``INT<bits>`` (or
    ``UINT<bits>``); ``node`` is unchanged."""
    probe = copy.deepcopy(node)
    for a in [a for a in probe.attribute if a.name == "accDataType"]:
        probe.attribute.remove(a)
    probe.attribute.append(helper.make_attribute("accDataType",
                                                 f"{'' if signed else 'U'}INT{bits}"))
    return lut_estimate(probe, fpgapart)


def uncapped_lut_estimate(node, bits: int = 32, fpgapart: str = DEFAULT_FPGA_PART) -> int | None:
    """FINN's LUT formula for ``node`` at ``bits`` accumulator bits without its data-type cap.

    The estimates at 2, 3, ... bits grow linearly until the cap, where they stop; a least-squares
    line through the points below the cap is evaluated at ``bits`` (FINN truncates each estimate to
    an integer, so the result is within about one LUT per 16 bits of extrapolation). Returns the
    plain estimate when ``bits`` is below the cap, and None when the estimates are not linear in
    the width (a layer whose cost does not depend on it, or another cost model)."""
    values = [lut_at_width(node, w, fpgapart=fpgapart) for w in range(2, max(bits, 3) + 1)]
    widths = np.arange(2, len(values) + 2)
    growing = [i for i in range(1, len(values)) if values[i] > values[i - 1]]
    if not growing:
        return None
    cap = growing[-1] + 2  # the last width at which the estimate still grew
    if cap >= bits:
        return values[bits - 2]
    if cap - 2 < 2:
        return None
    w, v = widths[: cap - 1], np.asarray(values[: cap - 1], dtype=float)
    slope, intercept = np.polyfit(w, v, 1)
    if np.max(np.abs(v - (slope * w + intercept))) > 1.0:
        return None
    return int(round(slope * bits + intercept))
