"""Exact QONNX export that carries each layer's accumulator width.

Brevitas 0.13's QONNX export of decoupled (A2Q/A2Q+) weight quantizers writes the layer's *raw*
float weights behind a ``Quant`` node that only divides by the post-scale and rounds, so the file
neither computes what was trained nor satisfies the L1 bound (Colbert et al., ICCV 2023, Eq. 15),
and no accumulator width is written at all. :func:`export_qonnx`:

1. exports with Brevitas's TorchScript QONNX exporter (``dynamo=False``), also for this package's
   quantizers (which Brevitas's exporter does not know);
2. replaces each weight initializer with the layer's quantized weight ``quant_weight(x).value``
   (``q * s``), so the weight ``Quant`` node reproduces the integers ``q`` exactly, and checks it;
3. runs qonnx's cleanup and records, for every accumulating node, the Brevitas layer, variant,
   target ``P``, ``N``, sign, ``M`` and a fingerprint of ``q`` (:mod:`brevitas_a2q.analysis.records`);
4. writes the file atomically.

Each layer's weights are quantized once per export: the quantized input and weight of every
accumulating layer are taken from the exporter's own first (untraced) forward pass.

:mod:`brevitas_a2q.quant.quantizers` also registers this package's weight proxy with Brevitas's own
exporters (``brevitas.export.export_qonnx`` and ``export_torch_qcdq``), which pick handlers by exact
proxy class: there, too, the exported weights are the exact quantized ``q * s`` (QONNX) or the
integers ``q`` (QCDQ). Brevitas's exporters write no accumulator records; :func:`export_qonnx` does.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from brevitas.export.onnx.qonnx.manager import QONNXManager
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.cleanup import cleanup_model
from torch import Tensor, nn

from brevitas_a2q.analysis.audit import (
    LayerCapture,
    capture_hooks,
    capture_layer,
    iter_accumulating_layers,
)
from brevitas_a2q.analysis.qonnx_analysis import accumulating_nodes, node_input_datatype
from brevitas_a2q.analysis.records import (
    AccumulatorRecord,
    channel_set_fingerprint,
    weight_fingerprint,
    write_records,
)
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.export.handlers import A2QQONNXWeightHandler, A2QWeightExportHandler
from brevitas_a2q.io import atomic_output, check_writable

__all__ = ["export_qonnx", "export_qonnx_model"]


class _Manager(QONNXManager):
    handlers = [A2QWeightExportHandler,
                *[h for h in QONNXManager.handlers if h is not A2QQONNXWeightHandler]]


def _brevitas_export(model: nn.Module, example_input: Tensor
                     ) -> tuple[ModelWrapper, list[LayerCapture]]:
    """Brevitas's QONNX export, capturing each accumulating layer's quantized input on the
    export's own (non-traced) forward pass, as :func:`brevitas_a2q.analysis.audit.capture_layers` does."""
    layers = list(iter_accumulating_layers(model))
    if not layers:
        raise A2QInputError("the model has no quantized Linear/Conv layer (brevitas.nn."
                            "QuantLinear, QuantConv1d/2d/3d, QuantConvTranspose1d/2d/3d) to "
                            "export accumulator records for")
    seen: dict[str, list] = {}
    handles = capture_hooks(layers, seen)  # the exporter's first forward pass is not traced

    def keep_weight(proxy, args, out):  # reused by the export handler: quantized once
        proxy.__dict__.setdefault("_a2q_export_weight", out)

    proxies = [layer.weight_quant for _, layer in layers]
    handles += [proxy.register_forward_hook(keep_weight) for proxy in proxies]
    _clear_export_handlers(model)  # Brevitas keeps a module's handler from an earlier export
    try:
        proto = _Manager.export(model, args=example_input, export_path=None, dynamo=False)
    except A2QInputError:
        raise
    except Exception as err:  # the exporter's errors are tracebacks from deep inside torch
        raise A2QInputError(f"Brevitas's QONNX export of the model failed: "
                            f"{type(err).__name__}: {err}") from err
    finally:
        for handle in handles:
            handle.remove()
        for proxy in proxies:
            proxy.__dict__.pop("_a2q_export_weight", None)
        _clear_export_handlers(model)  # ours are not Brevitas's exporters' handlers
    with torch.no_grad():
        captures = [capture_layer(name, layer, *seen[name][:2]) for name, layer in layers
                    if seen[name][2]]
    return ModelWrapper(proto), captures


def _clear_export_handlers(model: nn.Module) -> None:
    """Forget the export handlers Brevitas attached to the model's modules (it only assigns one
    where none is set, so handlers of one exporter would otherwise be reused by another)."""
    for module in model.modules():
        if getattr(module, "export_handler", None) is not None:
            module.export_handler = None


def _weight_quant_nodes(model: ModelWrapper) -> dict[str, object]:
    """Weight ``Quant`` nodes of the raw export, by the initializer they quantize."""
    return {n.input[0]: n for n in model.graph.node
            if n.op_type == "Quant" and model.get_initializer(n.input[0]) is not None}


def _find_weight_initializer(model: ModelWrapper, quant_nodes: dict, cap: LayerCapture,
                             taken: set[str]) -> str:
    """The initializer holding ``cap``'s float weight: Brevitas names it ``<layer>.weight``;
    otherwise the one whose values equal the layer's weight. Verified by value either way."""
    weight = cap.module.weight.detach().cpu().numpy().astype(np.float32)

    def same(name: str) -> bool:
        value = model.get_initializer(name)
        return value.shape == weight.shape and np.array_equal(value, weight)

    name = f"{cap.name}.weight"
    if name in quant_nodes and name not in taken and same(name):
        return name
    candidates = [n for n in quant_nodes if n not in taken and same(n)]
    if len(candidates) != 1:
        problem = "no" if not candidates else f"{len(candidates)} ({', '.join(candidates)})"
        raise A2QInputError(
            f"layer {cap.name!r} ({type(cap.module).__name__}, weight "
            f"{'x'.join(map(str, weight.shape))}): {problem} weight Quant node in the exported "
            "graph holds its weights, so the quantized weights cannot be placed. Shared or tied "
            "weights are not supported")
    return candidates[0]


def _set_param(model: ModelWrapper, node, index: int, value: np.ndarray) -> None:
    """Point input ``index`` of ``node`` at ``value`` unless it already holds it (Brevitas shares
    scalar constants between nodes, so a fresh initializer is made rather than overwriting)."""
    current = model.get_initializer(node.input[index])
    if current is not None and current.shape == value.shape and np.array_equal(current, value):
        return
    name = model.make_new_valueinfo_name()
    model.set_initializer(name, value)
    node.input[index] = name


def _place_quantized_weights(model: ModelWrapper, captures: list[LayerCapture]) -> None:
    quant_nodes = _weight_quant_nodes(model)
    taken: set[str] = set()
    for cap in captures:
        name = _find_weight_initializer(model, quant_nodes, cap, taken)
        taken.add(name)
        node = quant_nodes[name]
        zero_point = model.get_initializer(node.input[2])
        if zero_point is None or np.any(zero_point != 0):
            raise A2QInputError(f"layer {cap.name!r}: weights with a non-zero zero point are "
                                "not supported")
        scale = cap.weight_scale.detach().cpu().numpy().astype(np.float32)
        # q * s (the layer's quantized weight): the weight Quant node, round(w / s), gives back q
        model.set_initializer(name, cap.weight_value.cpu().numpy().astype(np.float32))
        _set_param(model, node, 1, scale)
        _set_param(model, node, 3, np.asarray(cap.weight_bits, dtype=np.float32))


def _graph_input_type(model: ModelWrapper, node, cap: LayerCapture
                      ) -> tuple[int | None, bool | None]:
    """The layer's input bits and sign: from the quantized tensor Brevitas gave it, else from the
    exported graph (a quantizer that returned a plain tensor, as Brevitas's BNN-PYNQ examples'
    do, still quantized it), else ``(None, None)`` for a float input (a float stem, "the input is
    already 8-bit RGB"), which only a layer without an accumulator target may have."""
    if cap.input_bits is not None:
        return cap.input_bits, bool(cap.input_signed)
    try:
        found = node_input_datatype(model, node.input[0], node)
    except A2QInputError:
        if cap.target_bits is not None:
            raise A2QInputError(
                f"layer {cap.name!r}: its input is not quantized, so its accumulator is not "
                f"integer and its target P = {cap.target_bits} cannot be checked; quantize its "
                "input (input_quant=...)") from None
        return None, None
    return found.bits, found.signed


def _records(model: ModelWrapper, captures: list[LayerCapture]) -> list[AccumulatorRecord]:
    pending = [(cap, cap.rows.to(torch.int64).cpu().numpy()) for cap in captures]
    records = []
    # each node's integer weights are read back by executing its weight Quant node as qonnx does
    # and must equal, in full, those of one Brevitas layer: the file reproduces the integers
    for node, weights in accumulating_nodes(model):
        found = weights.int_weights
        match = next((i for i, (_, q) in enumerate(pending)
                      if q.shape == found.shape and np.array_equal(q, found)), None)
        if match is None:
            raise A2QInputError(f"exported node {node.name!r} ({node.op_type}) has quantized "
                                "weights that match no Brevitas layer's integer weights (the "
                                "exported weight Quant node does not reproduce them)")
        cap, _ = pending.pop(match)
        input_bits, input_signed = _graph_input_type(model, node, cap)
        records.append(AccumulatorRecord(
            layer=cap.name, node=node.name, op_type=node.op_type, weight=weights.tensor,
            output=node.output[0], variant=cap.variant, target_bits=cap.target_bits,
            input_bits=input_bits, input_signed=input_signed,
            weight_bits=cap.weight_bits, out_channels=cap.out_channels,
            dot_length=cap.dot_length, fingerprint=weight_fingerprint(weights.int_weights),
            extra={"layer_type": type(cap.module).__name__,
                   "channel_set_fingerprint": channel_set_fingerprint(weights.int_weights)}))
    missing = [cap.name for cap, _ in pending]
    if missing:
        raise A2QInputError(f"layers {missing} were not found as accumulating nodes in the "
                            "exported graph (is their output used by the model?)")
    return records


def export_qonnx_model(model: nn.Module, example_input: Tensor) -> ModelWrapper:
    """Export ``model`` to a cleaned-up qonnx ``ModelWrapper`` with exact quantized weights and
    accumulator records (see the module docstring); nothing is written to disk."""
    if not isinstance(model, nn.Module):
        raise A2QInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise A2QInputError("example_input must be a torch.Tensor (one batch of model input)")
    was_training = model.training
    try:
        wrapper, captures = _brevitas_export(model, example_input)
    finally:
        model.train(was_training)
    _place_quantized_weights(wrapper, captures)
    wrapper = cleanup_model(wrapper)
    write_records(wrapper, _records(wrapper, captures))
    return wrapper


def export_qonnx(model: nn.Module, example_input: Tensor, path: str | os.PathLike,
                 overwrite: bool = False) -> ModelWrapper:
    """Export ``model`` to the QONNX file ``path``, exactly, with per-layer accumulator records.

    Weight initializers hold the layers' quantized weights (``q * s``), so executing the file with
    qonnx reproduces the Brevitas model and the integers read back from it satisfy each layer's
    A2Q/A2Q+ bound. Works for this package's quantizers, Brevitas's built-in
    ``Int8AccumulatorAware*WeightQuant`` and plain Brevitas QAT. Refuses an existing ``path``
    unless ``overwrite``; never leaves a partial file. Returns the exported ``ModelWrapper``.
    """
    check_writable(path, overwrite)
    wrapper = export_qonnx_model(model, example_input)
    with atomic_output(Path(path), overwrite=overwrite) as tmp:
        wrapper.save(tmp)
    return wrapper
