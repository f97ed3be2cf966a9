"""Bit-exact verification of FINN's dataflow graph against FINN's exact execution and the QONNX model.

Owns the executors (:mod:`.executors`; hls-arith in :mod:`.hls_arith` / :mod:`.hls_arith_ops`,
cppsim planning in :mod:`.cppsim`), the verification inputs (:mod:`.inputs`: random and extreme)
and the comparison (:mod:`.compare`). May import :mod:`finn_flow.steps` (node kinds, widths) and
FINN; never the build.

Two executors run the accelerator's dataflow graph at the widths set:

* ``cppsim`` (:func:`verify_cppsim`): the HLS layers compiled with g++
  (:func:`finn_flow.environment.prepare_cppsim`) against finn-hlslib and executed by FINN: the real
  HLS code, the authority where finn-hlslib is available;
* ``hls-arith`` (:func:`verify_hls_arith`): FINN's dataflow graph with every MVAU/VVAU
  accumulator and threshold comparison computed at its accDataType in two's complement, a model of
  finn-hlslib's arithmetic (:mod:`finn_flow.verify.hls_arith`) that needs no finn-hlslib and runs in CI.

Each is compared bit-exactly with FINN's Python execution of the same graph before specialization
and width setting (exact integer arithmetic), and the model outputs with the QONNX model the build
started from (qonnx). Random inputs rarely reach an accumulator's extremes (an overflowing
accumulator passes them), so the check also uses *extreme* inputs that drive the first
accumulating layer's accumulators to the ends of their range (:func:`extreme_inputs`), and checks
every MVAU/VVAU alone on inputs that reach each output channel's exact minimum and maximum
(:func:`verify_layer_extremes`). A mismatch is attributed to the first stage where outputs differ
(:func:`first_differences`): FINN's conversion, the widths set (hls-arith), or cppsim.
"""

from finn_flow.verify.compare import (
    EXECUTORS,
    STAGE_CONVERSION,
    STAGE_CPPSIM,
    STAGE_WIDTHS,
    VerificationResult,
    compare,
    first_differences,
)
from finn_flow.verify.executors import (
    Reference,
    cppsim_layer_extremes,
    reference_outputs,
    verify_cppsim,
    verify_hls_arith,
    verify_layer_extremes,
)
from finn_flow.verify.inputs import extreme_inputs, random_inputs, run_qonnx

__all__ = [
    "EXECUTORS",
    "STAGE_CONVERSION",
    "STAGE_CPPSIM",
    "STAGE_WIDTHS",
    "Reference",
    "VerificationResult",
    "compare",
    "cppsim_layer_extremes",
    "extreme_inputs",
    "first_differences",
    "random_inputs",
    "reference_outputs",
    "run_qonnx",
    "verify_cppsim",
    "verify_hls_arith",
    "verify_layer_extremes",
]
