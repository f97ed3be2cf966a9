"""qonnx custom ops of the ``finn_flow.verify.hls_arith_ops`` domain: FINN's MVAU and VVAU executed with
finn-hlslib's accumulator arithmetic (see :mod:`finn_flow.verify.hls_arith`).

qonnx's registry imports this module when it executes a node of this domain; it needs FINN. Each op
is FINN's generic layer (same attributes; exact dot products: an MVAU's as one exact integer matrix
product, a VVAU's with FINN's own Python ``execute_node``) plus ``hlsAccDataType``, the type the HLS
code accumulates in, and only the two steps finn-hlslib does differently from FINN's Python model
are reimplemented here: the accumulator wraps modulo ``2^P`` in two's complement (``mac.hpp``: ``res
+= mul(...)`` with ``res`` of the accumulator type), and each threshold is compared with the
*wrapped* accumulator (``activations.hpp``: ``ThresholdsActivation::activate`` adds
``comp::less_equal(threshold, accu)`` to ``ActVal``; FINN instantiates it with ``less_equal``, i.e.
``accu >= threshold``).
"""

from __future__ import annotations

import numpy as np
from finn.custom_op.fpgadataflow.matrixvectoractivation import MVAU
from finn.custom_op.fpgadataflow.vectorvectoractivation import VVAU
from qonnx.core.datatype import DataType

from finn_flow.errors import FinnBuildError
from finn_flow.verify.hls_arith import (
    exact_matmul,
    integer_weights_info,
    threshold_step,
    wrap_twos_complement,
)

__all__ = ["HlsArithMVAU", "HlsArithVVAU", "custom_op"]

# exact integers in float64
_EXACT = 2.0 ** 53


class _HlsArithmetic:
    """Mixin for FINN's MVAU/VVAU: ``accumulate`` (FINN's exact sums), then the wrap and the
    threshold step of finn-hlslib."""

    def get_nodeattr_types(self) -> dict:
        attrs = super().get_nodeattr_types()
        # the type finn-hlslib's accumulator has: the thresholds' type TA, or the output type of a
        # layer without activation (PassThroughActivation<TO>); set by finn_flow.verify.hls_arith.ToHlsArith
        attrs["hlsAccDataType"] = ("s", True, "")
        return attrs

    def accumulate(self, context: dict, graph) -> np.ndarray:
        """Exact accumulator values (float64 integers, channels last): for an MVAU with integer
        input type and weights, the exact int64 product of the input vectors and the weights
        (what FINN's Python model computes with ``np.matmul`` where that is exact); otherwise
        FINN's own ``execute_node`` of the layer with ``noActivation`` = 1 on float64 inputs."""
        node = self.onnx_node
        if self.get_nodeattr("binaryXnorMode") or DataType[
                self.get_nodeattr("inputDataType")] == DataType["BIPOLAR"]:
            raise FinnBuildError(f"hls-arith does not model the xnor-popcount arithmetic of "
                                 f"{node.name} (binary/bipolar layer); use cppsim")
        x = np.asarray(context[node.input[0]], dtype=np.float64)
        idt = DataType[self.get_nodeattr("inputDataType")]
        if idt.is_integer() and not (np.array_equal(x, np.round(x))
                                     and x.min() >= idt.min() and x.max() <= idt.max()):
            raise FinnBuildError(f"{node.name}: input values outside its input type {idt.name} "
                                 f"(range [{x.min()}, {x.max()}])")
        acc = self._integer_matmul(x, context)
        if acc is None:  # non-integer weights or input type: FINN's own dot products
            acc = self._finn_dot_products(x, context, graph)
        if not (np.array_equal(acc, np.round(acc)) and np.all(np.abs(acc) < _EXACT)):
            raise FinnBuildError(f"{node.name}: the dot products are not exact integers in "
                                 "float64 (non-integer weights or inputs, or |sum| >= 2^53)")
        return acc

    def _integer_matmul(self, x: np.ndarray, context: dict) -> np.ndarray | None:
        """An MVAU's dot products in exact integer arithmetic (one 2-D product over all input
        vectors, :func:`finn_flow.verify.hls_arith.exact_matmul`), shaped as FINN's output; None
        for a VVAU, a non-integer input type or non-integer weights."""
        node = self.onnx_node
        weights = context[node.input[1]]
        if not isinstance(self, MVAU) or not DataType[self.get_nodeattr("inputDataType")].is_integer() \
                or weights.ndim != 2 or integer_weights_info(weights) is None:
            return None
        acc = exact_matmul(x.reshape(-1, weights.shape[0]), weights)
        return acc.astype(np.float64).reshape(context[node.output[0]].shape)

    def _finn_dot_products(self, x: np.ndarray, context: dict, graph) -> np.ndarray:
        """FINN's own ``execute_node`` of the layer with ``noActivation`` = 1 on float64 inputs."""
        node = self.onnx_node
        saved_input, saved_output = context[node.input[0]], context[node.output[0]]
        saved_no_act = self.get_nodeattr("noActivation")
        context[node.input[0]] = x
        self.set_nodeattr("noActivation", 1)
        try:
            super().execute_node(context, graph)
            return np.asarray(context[node.output[0]], dtype=np.float64)
        finally:
            self.set_nodeattr("noActivation", saved_no_act)
            context[node.input[0]] = saved_input
            context[node.output[0]] = saved_output

    def accumulator_datatype(self) -> DataType:
        name = self.get_nodeattr("hlsAccDataType")
        if not name:
            raise FinnBuildError(f"{self.onnx_node.name}: hlsAccDataType is not set; convert the "
                                 "graph with finn_flow.verify.hls_arith.ToHlsArith")
        return DataType[name]

    def activate(self, acc: np.ndarray, context: dict) -> np.ndarray:
        """finn-hlslib's output from the wrapped accumulator ``acc`` (channels last):
        ``PassThroughActivation`` (the accumulator itself) or ``ThresholdsActivation``."""
        if self.get_nodeattr("noActivation"):
            return acc
        thresholds = np.asarray(context[self.onnx_node.input[2]], dtype=np.float64)
        odt_is_bipolar = self.get_nodeattr("outputDataType") == "BIPOLAR"
        return threshold_step(acc, thresholds, out_scale=2 if odt_is_bipolar else 1,
                              out_bias=-1 if odt_is_bipolar else self.get_nodeattr("ActVal"))

    def execute_node(self, context: dict, graph) -> None:
        node = self.onnx_node
        acc = wrap_twos_complement(self.accumulate(context, graph), self.accumulator_datatype())
        out = self.activate(acc, context)
        shape = context[node.output[0]].shape
        context[node.output[0]] = out.astype(np.float32).reshape(shape)


class HlsArithMVAU(_HlsArithmetic, MVAU):
    """FINN's MVAU with finn-hlslib's ``Matrix_Vector_Activate_(Stream_)Batch`` arithmetic
    (``mvau.hpp``): accumulator of type ``hlsAccDataType``, wrapping; thresholds on the wrapped
    value."""


class HlsArithVVAU(_HlsArithmetic, VVAU):
    """FINN's VVAU with finn-hlslib's ``Vector_Vector_Activate_(Stream_)Batch`` arithmetic
    (``vvau.hpp``), as :class:`HlsArithMVAU`."""


# qonnx's registry looks ops up by op_type in this dict
custom_op = {"MVAU": HlsArithMVAU, "VVAU": HlsArithVVAU}
