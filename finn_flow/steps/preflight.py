"""Refuse, before FINN runs, the activation quantizers FINN cannot convert or cannot round as QONNX.

FINN's ``ConvertQuantActToMultiThreshold`` (``finn/transformation/qonnx/quant_act_to_multithreshold.py``)
converts every ``Quant``/``BipolarQuant`` node in the activation path (input and output not
constant) of at most ``max_multithreshold_bit_width`` bits (8 in FINN's builder) into a
``MultiThreshold``; the handler is chosen by the op type of the node in front of it
(``qonnx_activation_handlers.py``): ``Relu``/``Selu`` -> ``QuantReluHandler``, anything else (the
graph input, ``Flatten``, ``Mul``, ``Add``, ``BatchNormalization``, ...) -> ``QuantIdentityHandler``.
Their conditions, which FINN checks only deep inside the build:

* every converted ``Quant`` needs a zero point of 0 and a constant bit width;
* after a ``Relu``: unsigned and not narrow ("FINN only supports unsigned and non-narrow Quant nodes
  for Relu activations");
* identity (not after a ``Relu``): upstream FINN dev needs it signed ("FINN only supports signed
  Quant nodes for identity activations"); FINN+ 1.6.1 also converts unsigned ones
  (:func:`finn_flow.finn_compat.unsigned_identity_quant_supported`). Both FINNs get the same graph:
  an unsigned, non-narrow one gets an exact ``Relu`` in front
  (:func:`finn_flow.steps.upstream_rewrites.step_a2q_relu_before_unsigned_quant`), a narrow unsigned
  one is refused here on both; a ``BipolarQuant`` needs a scale of exactly 1;
* FINN's thresholds always round to nearest whatever ``rounding_mode`` says, and only ``ROUND``
  (half to even) is made exact by :mod:`finn_flow.steps.ties`; FINN's Selu thresholds are not a rounding
  grid at all;
* wider activation quantizers are not converted to thresholds; FINN+ turns them into ``Requant``
  layers that round half up (``finn/custom_op/fpgadataflow/requant.py``), which cannot match
  QONNX's round half to even
  (:func:`finn_flow.finn_compat.high_bit_quant_rounds_half_up`).

:func:`check_activation_quantizers` raises :class:`~brevitas_a2q.errors.A2QInputError` (exit status
2 in the CLI) naming the node, where it sits and the fix.
"""

from __future__ import annotations

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.basic import get_by_name

from brevitas_a2q.errors import A2QInputError
from finn_flow.finn_compat import high_bit_quant_rounds_half_up

__all__ = ["MAX_MULTITHRESHOLD_BITS", "check_activation_quantizers"]

MAX_MULTITHRESHOLD_BITS = 8  # DataflowBuildConfig.max_multithreshold_bit_width's default
_PASS_THROUGH = ("Flatten", "Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze")
_ROUND = ("ROUND", "HALF_EVEN")


def _attr(node, name: str, default=None):
    a = get_by_name(node.attribute, name)
    if a is None:
        return default
    value = a.s if a.type == a.STRING else a.i
    return value.decode() if isinstance(value, bytes) else value


def _where(model: ModelWrapper, node) -> str:
    """Where a Quant node sits, for messages: the model's input quantizer or after which node."""
    producer = model.find_producer(node.input[0])
    inputs = {i.name for i in model.graph.input}
    tensor = node.input[0]
    while producer is not None and producer.op_type in _PASS_THROUGH:
        tensor = producer.input[0]
        producer = model.find_producer(tensor)
    if producer is None and tensor in inputs:
        return f"the model's input quantizer (reads the model input {tensor!r})"
    first = model.find_producer(node.input[0])
    return f"after the {first.op_type} node {first.name!r}" if first is not None else \
        f"on tensor {node.input[0]!r}"


def check_activation_quantizers(model: ModelWrapper, source: str = "the model",
                                max_bits: int = MAX_MULTITHRESHOLD_BITS) -> None:
    """Raise :class:`~brevitas_a2q.errors.A2QInputError` for the first activation ``Quant`` node
    that FINN's Quant-to-MultiThreshold conversion would reject, or convert with a rounding
    other than QONNX's (see the module docstring). ``source`` names the model in messages."""
    for node in model.graph.node:
        if node.op_type not in ("Quant", "BipolarQuant"):
            continue
        if model.get_initializer(node.input[0]) is not None or \
                model.get_initializer(node.output[0]) is not None:
            continue  # a weight quantizer: FINN folds it, no thresholds
        name = f"{node.op_type} node {node.name!r}, {_where(model, node)}"
        producer = model.find_producer(node.input[0])
        after = producer.op_type if producer is not None else None
        if node.op_type == "BipolarQuant":
            scale = model.get_initializer(node.input[1])
            if after not in ("Relu", "Selu") and (scale is None or np.size(scale) != 1
                                                  or float(np.ravel(scale)[0]) != 1.0):
                raise A2QInputError(
                    f"{source}: {name} has a scale other than a single 1.0; FINN converts bipolar "
                    "identity quantizers only with scale 1. Use a bipolar quantizer with a constant "
                    "scale of 1")
            continue
        bits = model.get_initializer(node.input[3])
        if bits is None:
            raise A2QInputError(f"{source}: {name} has no constant bit width; FINN needs static "
                                "bit widths (export the model in eval mode with fixed bit widths)")
        if float(np.max(bits)) > max_bits:
            if high_bit_quant_rounds_half_up():
                raise A2QInputError(
                    f"{source}: {name} has {float(np.max(bits)):g} bits; FINN+ turns activation "
                    f"quantizers above {max_bits} bits into a Requant layer that rounds half up "
                    "(floor(x + 0.5)), not half to even as QONNX and Brevitas do, so ties would "
                    f"differ. Use activation quantizers of at most {max_bits} bits")
            continue  # upstream FINN leaves it as a Quant node (not converted to thresholds)
        zero_point = model.get_initializer(node.input[2])
        if zero_point is None or np.any(np.asarray(zero_point) != 0):
            raise A2QInputError(f"{source}: {name} has a non-zero zero point; FINN converts only "
                                "zero-point-0 quantizers. Use a symmetric quantizer (zero point 0)")
        signed, narrow = bool(_attr(node, "signed", 1)), bool(_attr(node, "narrow", 0))
        mode = str(_attr(node, "rounding_mode", "ROUND")).upper()
        if mode not in _ROUND:
            raise A2QInputError(
                f"{source}: {name} rounds with rounding_mode {mode}; FINN's thresholds always round "
                "to nearest, so the accelerator would not compute what the model does. Use a "
                "round-to-nearest activation quantizer (Brevitas's default, exported as ROUND)")
        if after == "Selu":
            raise A2QInputError(
                f"{source}: {name} quantizes a Selu; FINN's Selu thresholds are not a rounding "
                "grid, so they cannot reproduce QONNX's round half to even. Use a QuantReLU")
        if after == "Relu" and (signed or narrow):
            raise A2QInputError(
                f"{source}: {name} is {'signed' if signed else 'narrow'} after a ReLU; FINN only "
                "converts unsigned, non-narrow quantizers after a ReLU. Use QuantReLU with an "
                "unsigned quantizer such as Uint8ActPerTensorFloat (narrow_range=False)")
        if after != "Relu" and not signed and narrow:
            raise A2QInputError(
                f"{source}: {name} is a narrow unsigned identity quantizer; upstream FINN converts "
                "identity quantizers (any not directly after a ReLU) only when signed ('FINN only "
                "supports signed Quant nodes for identity activations'), and the exact rewrite "
                "that lets both FINNs build an unsigned one (a ReLU in front, "
                "finn_flow.steps.upstream_rewrites) needs it non-narrow (FINN converts only "
                "non-narrow quantizers after a ReLU). Use narrow_range=False, or a signed quantizer, "
                "e.g. QuantIdentity(act_quant=Int8ActPerTensorFloat)")
