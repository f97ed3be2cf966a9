"""Bit-exact comparison of executors' outputs and attribution of a mismatch to the first stage
where outputs differ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from finn_flow.verify.hls_arith import DESCRIPTION as HLS_ARITH_DESCRIPTION

EXECUTORS = {"cppsim": "C++ simulation of the HLS code FINN generates, compiled with g++ against "
                       "finn-hlslib",
             "hls-arith": HLS_ARITH_DESCRIPTION}
# where the outputs first differ, in the order the flow produces them
STAGE_CONVERSION = ("QONNX model vs FINN's graph before specialization "
                    "(FINN's conversion/streamlining)")
STAGE_WIDTHS = "FINN's graph vs the dataflow graph at the widths set (hls-arith)"
STAGE_CPPSIM = "cppsim (the compiled HLS code)"
FLOAT_TAIL_TOLERANCE = 1e-5  # relative, for the float ops FINN leaves after the integer layers


@dataclass
class VerificationResult:
    """Per input set: how many inputs matched bit-exactly, and the worst difference."""

    kind: str  # "random", "real" or "extreme"
    inputs: int
    matched: int
    max_abs_diff: float
    mismatched_indices: list[int] = field(default_factory=list)
    final_max_rel_diff: float | None = None  # model output vs QONNX, relative to max |output|
    final_argmax_agree: int | None = None
    executor: str = "cppsim"  # "cppsim" or "hls-arith"
    # FINN's graph before specialization vs the QONNX model (beyond float-tail rounding)
    reference_mismatched_indices: list[int] = field(default_factory=list)
    reference_max_rel_diff: float | None = None
    final_mismatched_indices: list[int] = field(default_factory=list)  # beyond float rounding
    # cppsim with hls-arith run too: inputs whose accelerator outputs agree bit for bit
    hls_arith_agreed: int | None = None
    # what the model outputs are compared with: "exact" (finn_flow.verify.exact) or "QONNX"
    reference: str = "QONNX"
    # with the exact reference: QONNX float32 values that differ from the exact evaluation within
    # float32 error of a rounding boundary (explained), and beyond it (unexplained: a failure)
    qonnx_float32_rounding: int = 0
    qonnx_unexplained: int = 0

    @property
    def ok(self) -> bool:
        """Every accelerator output bit-exact, the model outputs equal to the reference's up to
        float rounding in FINN's float tail (relative 1e-5), and no QONNX difference from the
        exact evaluation left unexplained."""
        tail_ok = self.final_max_rel_diff is None or \
            self.final_max_rel_diff <= FLOAT_TAIL_TOLERANCE
        return self.matched == self.inputs and tail_ok and self.qonnx_unexplained == 0

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def describe(self, first_differences: dict[str, int] | None = None) -> str:
        """One line: how many accelerator outputs were bit-exact and the verdict, never reading
        as a pass when the set failed. All accelerator outputs bit-exact but the model outputs
        off the QONNX model beyond float rounding is said as a MISMATCH first.
        ``first_differences``: inputs per stage where they first differ
        (:func:`first_differences`)."""
        rel = "-" if self.final_max_rel_diff is None else f"{self.final_max_rel_diff:.2g}"
        where = "; ".join(f"{stage}: {n}/{self.inputs}"
                          for stage, n in (first_differences or {}).items())
        where = f"; outputs first differ at {where}" if where and not self.ok else ""
        if self.hls_arith_agreed is not None:
            where += f"; hls-arith agreed bit for bit on {self.hls_arith_agreed}/{self.inputs}"
        if self.reference == "exact":
            where += (f"; QONNX float32 rounding: {self.qonnx_float32_rounding} value(s) within "
                      "float32 error of a rounding boundary")
            if self.qonnx_unexplained:
                where += f", {self.qonnx_unexplained} QONNX difference(s) UNEXPLAINED"
        head, ref = f"{self.executor} {self.kind}:", self.reference
        if ref == "exact":
            ref = "the exact evaluation"
        if self.ok:
            return (f"{head} {self.matched}/{self.inputs} accelerator outputs bit-exact (ok; "
                    f"model output vs {ref} rel. diff {rel}{where})")
        if self.matched == self.inputs:
            return (f"{head} MISMATCH: the accelerator outputs were bit-exact "
                    f"({self.matched}/{self.inputs}), but the model outputs differ from {ref} "
                    f"by rel. {rel}, beyond float rounding ({FLOAT_TAIL_TOLERANCE:g}){where}")
        return (f"{head} {self.matched}/{self.inputs} accelerator outputs bit-exact (MISMATCH; "
                f"model output vs {ref} rel. diff {rel}{where})")



def _rel_diffs(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Per input, max |expected - actual| relative to max |expected| over the whole set."""
    fe = np.asarray(expected, dtype=np.float64).reshape(len(expected), -1)
    fa = np.asarray(actual, dtype=np.float64).reshape(len(actual), -1)
    scale = max(float(np.max(np.abs(fe))), 1e-30) if fe.size else 1.0
    return np.max(np.abs(fe - fa), axis=1) / scale if fe.size else np.zeros(len(fe))


def compare(kind: str, expected: np.ndarray, actual: np.ndarray,
            final_expected: np.ndarray | None = None,
            final_actual: np.ndarray | None = None, *, executor: str = "cppsim",
            final_reference: np.ndarray | None = None) -> VerificationResult:
    """Bit-exact comparison of the accelerator's integer outputs (``actual``) with the exact
    integer arithmetic of the same graph (``expected``). ``final_*``: the model outputs after
    the float tail FINN leaves outside the accelerator, against the QONNX model, which may differ
    by float rounding only (reported as ``final_max_rel_diff``). ``final_reference``: the model
    outputs of FINN's graph before specialization, compared with the QONNX model the same way
    (``reference_*``: where FINN's conversion already changed the result)."""
    expected = np.asarray(expected, dtype=np.float64).reshape(len(expected), -1)
    actual = np.asarray(actual, dtype=np.float64).reshape(len(actual), -1)
    same = np.all(expected == actual, axis=1)
    diff = float(np.max(np.abs(expected - actual))) if expected.size else 0.0
    result = VerificationResult(kind=kind, inputs=len(expected), matched=int(same.sum()),
                                max_abs_diff=diff,
                                mismatched_indices=[int(i) for i in np.flatnonzero(~same)],
                                executor=executor)
    if final_expected is not None and final_actual is not None:
        fe = np.asarray(final_expected, dtype=np.float64).reshape(len(final_expected), -1)
        fa = np.asarray(final_actual, dtype=np.float64).reshape(len(final_actual), -1)
        rel = _rel_diffs(fe, fa)
        result.final_max_rel_diff = float(np.max(rel)) if rel.size else 0.0
        result.final_mismatched_indices = [int(i) for i in
                                           np.flatnonzero(rel > FLOAT_TAIL_TOLERANCE)]
        result.final_argmax_agree = int((fe.argmax(1) == fa.argmax(1)).sum())
    if final_expected is not None and final_reference is not None:
        rel = _rel_diffs(final_expected, final_reference)
        result.reference_max_rel_diff = float(np.max(rel)) if rel.size else 0.0
        result.reference_mismatched_indices = [
            int(i) for i in np.flatnonzero(rel > FLOAT_TAIL_TOLERANCE)]
    return result


def first_differences(results: list[VerificationResult]) -> dict[str, dict[str, int]]:
    """Per input set (``kind``), how many inputs first differ at each stage, in the flow's
    order: :data:`STAGE_CONVERSION` (FINN's graph before specialization already differs from the
    QONNX model), :data:`STAGE_WIDTHS` (hls-arith differs from FINN's exact graph), cppsim (differs
    where hls-arith, if it ran, agreed). Sets without differences are absent."""
    out: dict[str, dict[str, int]] = {}
    for kind in dict.fromkeys(r.kind for r in results):
        same_kind = [r for r in results if r.kind == kind]
        by_executor = {r.executor: r for r in same_kind}
        conversion = set().union(*(r.reference_mismatched_indices for r in same_kind))
        widths = set(by_executor["hls-arith"].mismatched_indices) \
            if "hls-arith" in by_executor else set()
        cppsim = set(by_executor["cppsim"].mismatched_indices) \
            if "cppsim" in by_executor else set()
        cppsim_stage = ("hls-arith vs " if "hls-arith" in by_executor
                        else "FINN's graph vs ") + STAGE_CPPSIM
        tail = set().union(*(r.final_mismatched_indices for r in same_kind))
        counts = {STAGE_CONVERSION: len(conversion), STAGE_WIDTHS: len(widths - conversion),
                  cppsim_stage: len(cppsim - conversion - widths),
                  "the float tail after the accelerator (model output vs the reference)":
                      len(tail - conversion - widths - cppsim)}
        counts = {stage: n for stage, n in counts.items() if n}
        if counts:
            out[kind] = counts
    return out
