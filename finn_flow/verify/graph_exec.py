"""Repeated execution of one ONNX graph, exactly as qonnx's ``execute_onnx`` executes it, without
redoing per input what does not depend on the input.

qonnx's ``execute_onnx`` (and FINN's ``execute_parent`` around it) prepares everything again for
every input: it reloads the parent and child models from disk, builds the execution context
(every initializer converted to numpy), creates an onnxruntime session per standard node, re-runs
the nodes whose inputs are all constants (the weight ``Quant`` nodes of a QONNX model) and checks
every integer-annotated tensor, weights included, with ``sanitize_quant_values`` (a Python-level
``max`` over each tensor). Verification runs hundreds of inputs through graphs of ResNet18's
size, so :class:`GraphRunner` does these once per graph:

* the context's initializers, the outputs of constant nodes, and the sanitizing of constant
  tensors are computed once (constants are the same for every input; the checks give the same
  result every time);
* each standard node's onnxruntime session (built from the same single-node model qonnx builds)
  is created once and reused;
* a ``StreamingDataflowPartition`` runs its child model with its own runner (loaded once), as
  FINN's node does (outputs renamed, the child's context prefixed with the node's name).

Every node still executes per input, in graph order, with the same code: FINN's and qonnx's
custom ops through ``execute_custom_node``, standard ops through onnxruntime, and every
non-constant integer-annotated tensor sanitized as qonnx does (qonnx's ``sanitize_quant_values``
wherever a value is not allowed by its type, so rounding, its warning and its error are qonnx's
own). Two things are computed differently with the same result: FINN's generic MVAU multiplies
as one 2-D matrix product where every partial sum is an exact float32 integer
(:func:`_exact_mvau`; FINN's 4-D ``np.matmul`` gives the same bits, an order of magnitude
slower), and onnxruntime sessions and numpy's BLAS run on one thread (:func:`one_thread`).
``tests/test_verify_fast_exec.py`` checks every tensor against ``execute_onnx`` and
``execute_parent`` on real networks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper

__all__ = ["GraphRunner", "one_thread"]

_PARTITION = "StreamingDataflowPartition"


def _single_node_model(node, graph, opset_version: int):
    """The one-node model qonnx's ``execute_node`` builds for onnxruntime (same inputs, outputs
    and opset), and the value infos of its outputs in that model's order."""
    from onnx import helper
    from qonnx.util.basic import qonnx_make_model

    node_inputs = [x for x in graph.input if x.name in node.input]
    node_inputs += [x for x in graph.output if x.name in node.input]
    node_inputs += [x for x in graph.value_info if x.name in node.input]
    node_outputs = [x for x in graph.output if x.name in node.output]
    node_outputs += [x for x in graph.value_info if x.name in node.output]
    for attr in node.attribute:
        if attr.type == 5:  # a subgraph attribute
            for sub_node in attr.g.node:
                sub_inputs = [x for x in graph.value_info if x.name in sub_node.input]
                node_inputs += [x for x in sub_inputs if x not in node_inputs]
    node_model = qonnx_make_model(helper.make_graph(nodes=[node], name="single-node-exec",
                                                    inputs=node_inputs, outputs=node_outputs))
    node_model.opset_import[0].version = opset_version
    return node_model, [x.name for x in node_outputs]


def one_thread():
    """Context manager: numpy's BLAS on one thread. Verification runs many small products one
    after the other; a BLAS thread pool sized for the whole machine makes each of them many times
    slower wherever the cores are shared. The integer products of :func:`_exact_mvau` and
    :func:`finn_flow.verify.hls_arith.exact_matmul` are exact in any order of addition, so the
    thread count changes none of them (a float product elsewhere may round differently with a
    different split, as it already does from one machine to another)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _is_generic_mvau(node) -> bool:
    return node.op_type == "MVAU" and node.domain == "finn.custom_op.fpgadataflow"


def _exact_mvau(node, context: dict) -> bool:
    """FINN's generic ``MVAU.execute_node`` (Python model), computed with the product as one 2-D
    float32 matrix product, where that gives FINN's result bit for bit: float32 integer inputs and
    weights with ``max|x| * max_j sum_k |w_kj| < 2^24``, so every partial sum is an exact float32
    integer in any order of addition (FINN's ``np.matmul`` on its 4-D input as well). numpy runs
    the 2-D product in BLAS, FINN's 4-D one an order of magnitude slower. Returns False (nothing
    done) where the bound does not hold or the layer is binary/bipolar: FINN's own code runs."""
    from qonnx.custom_op.general.multithreshold import multithreshold
    from qonnx.custom_op.registry import getCustomOp

    from finn_flow.verify.hls_arith import integer_weights_info

    inst = getCustomOp(node)
    x, w = context[node.input[0]], context[node.input[1]]
    if inst.get_nodeattr("binaryXnorMode") or "BIPOLAR" in (
            inst.get_nodeattr("inputDataType"), inst.get_nodeattr("weightDataType")):
        return False
    if x.dtype != np.float32 or w.dtype != np.float32 or w.ndim != 2:
        return False
    info = integer_weights_info(w)
    if info is None or not np.array_equal(x, np.round(x)):
        return False
    if float(np.abs(x).max(initial=0)) * info["l1"] * (1 + 2.0 ** -20) >= 2.0 ** 24:
        return False
    shape = tuple(inst.get_normal_input_shape())
    result = (x.reshape(-1, w.shape[0]) @ w).reshape(shape[:-1] + (w.shape[1],))
    if inst.get_nodeattr("noActivation") == 0:  # FINN's code from here on
        odt_is_bipolar = inst.get_nodeattr("outputDataType") == "BIPOLAR"
        out_scale = 2 if odt_is_bipolar else 1
        out_bias = -1 if odt_is_bipolar else inst.get_nodeattr("ActVal")
        if result.ndim == 4:
            result = result.transpose((0, 3, 1, 2))
        result = multithreshold(result, context[node.input[2]], out_scale, out_bias)
        if result.ndim == 4:
            result = result.transpose((0, 2, 3, 1))
    context[node.output[0]] = result.reshape(context[node.output[0]].shape)
    return True


class GraphRunner:
    """``model`` prepared for repeated execution (module docstring); :meth:`run` takes the place
    of ``execute_onnx(model, inputs, return_full_exec_context)``."""

    def __init__(self, model: ModelWrapper) -> None:
        from qonnx.analysis.topology import nodes_topologically_sorted

        if not model.check_all_tensor_shapes_specified():
            raise ValueError("Found unspecified tensor shapes, try infer_shapes")
        if not model.analysis(nodes_topologically_sorted)["nodes_topologically_sorted"]:
            raise ValueError("Nodes must be topologically sorted.")
        exec_mode = model.get_metadata_prop("exec_mode")
        if exec_mode not in (None, ""):
            raise ValueError('Metadata property "exec_mode" is set to an unknown value.')
        self.model = model
        self.graph = model.graph
        self._sessions: dict[int, tuple[object, list[str]]] = {}
        self._children: dict[str, GraphRunner] = {}
        self._context = model.make_empty_exec_context()
        self._input_names = {x.name for x in self.graph.input}
        self._constant = {x.name for x in self.graph.initializer} - self._input_names
        self._sanitized: set[str] = set()
        self._datatypes: dict = {}
        opsets = model.get_opset_imports()
        self._opset = [opsets.get(n.domain, self._preferred_opset()) for n in self.graph.node]
        self._per_input: list[int] = []
        self._fold_constants()
        used = {i for k in self._per_input for i in self.graph.node[k].input}
        self._sanitize(sorted(used & self._constant), self._context)
        self._fresh = [name for name, value in self._context.items()
                       if name not in self._constant and value is not None]

    @staticmethod
    def _preferred_opset() -> int:
        from qonnx.util.basic import get_preferred_qonnx_opset

        return get_preferred_qonnx_opset()

    def _fold_constants(self) -> None:
        """Run once every node whose inputs are all constants (a constant's value is the same for
        every input); the others run per input."""
        for index, node in enumerate(self.graph.node):
            if node.input and all(i in self._constant or i == "" for i in node.input) \
                    and node.op_type != _PARTITION:
                self._execute(index, self._context)
                self._constant.update(node.output)
            else:
                self._per_input.append(index)

    def _sanitize(self, names, context: dict, done: set | None = None) -> None:
        """qonnx's ``sanitize_quant_values`` on ``names``, skipping what it would leave unchanged:
        a tensor whose values its integer type allows (rounding error 0), a constant already
        checked, and a tensor in ``done`` (sanitized as its producer's output in this run and
        not written since: each tensor has one producer)."""
        from qonnx.util.basic import get_sanitize_quant_tensors, sanitize_quant_values

        if get_sanitize_quant_tensors() == 0:
            return
        for name in names:
            if name in self._sanitized or (done is not None and name in done):
                continue
            if name not in self._datatypes:
                self._datatypes[name] = self.model.get_tensor_datatype(name)
            dtype = self._datatypes[name]
            if dtype.is_integer():
                allowed = dtype.allowed(context[name])
                if not (allowed.all() if isinstance(allowed, np.ndarray) else allowed):
                    sanitize_quant_values(self.model, [name], context)
            if name in self._constant:
                self._sanitized.add(name)

    def _execute(self, index: int, context: dict, done: set | None = None) -> None:
        """Node ``index`` as ``execute_onnx`` runs it; ``done``: tensors sanitized in this run."""
        node = self.graph.node[index]
        self._sanitize(node.input, context, done)
        if node.op_type == _PARTITION:
            self._run_partition(node, context)
        else:
            from qonnx.custom_op.registry import is_custom_op

            if _is_generic_mvau(node) and _exact_mvau(node, context):
                pass
            elif is_custom_op(node.domain, node.op_type):
                from qonnx.core.execute_custom_node import execute_custom_node

                execute_custom_node(node, context, self.graph, onnx_opset_version=self._opset[index])
            else:
                self._run_standard(index, node, context)
        self._sanitize(node.output, context)
        if done is not None:
            done.update(node.output)

    def _run_standard(self, index: int, node, context: dict) -> None:
        """The node through onnxruntime, its session created once."""
        import warnings

        if index not in self._sessions:
            import onnxruntime as rt

            node_model, out_names = _single_node_model(node, self.graph, self._opset[index])
            options = rt.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            self._sessions[index] = (rt.InferenceSession(node_model.SerializeToString(), options),
                                     out_names)
        session, out_names = self._sessions[index]
        outputs = session.run(None, {name: context[name] for name in node.input})
        for name in node.output:
            if name not in out_names:
                raise ValueError(f"Output {name} not found in node outputs.")
            value = outputs[out_names.index(name)]
            if value.shape != context[name].shape:
                warnings.warn(f"Output shapes disagree after node {node.name} execution: found "
                              f"{value.shape} vs expected {context[name].shape}", stacklevel=2)
            context[name] = value

    def _run_partition(self, node, context: dict) -> None:
        """FINN's ``StreamingDataflowPartition.execute_node`` with the child runner cached."""
        from qonnx.custom_op.registry import getCustomOp

        inst = getCustomOp(node)
        path = inst.get_nodeattr("model")
        if path not in self._children:
            self._children[path] = GraphRunner(ModelWrapper(str(path)))
        child = self._children[path]
        full = inst.get_nodeattr("return_full_exec_context") == 1
        inputs = {child.graph.input[i].name: context[name] for i, name in enumerate(node.input)}
        ret = child.run(inputs, return_full_context=full)
        child_outputs = [x.name for x in child.graph.output]
        for i, name in enumerate(node.output):
            context[name] = ret[child_outputs[i]]
        if full:
            for name, value in ret.items():
                if name not in child_outputs:
                    context[node.name + "_" + name] = value

    def set_partition(self, child: str | Path, return_full_context: bool) -> None:
        """Point the (single) ``StreamingDataflowPartition`` at ``child``, as FINN's
        ``execute_parent`` does."""
        from qonnx.custom_op.registry import getCustomOp

        node = next(n for n in self.graph.node if n.op_type == _PARTITION)
        inst = getCustomOp(node)
        inst.set_nodeattr("model", str(child))
        inst.set_nodeattr("return_full_exec_context", 1 if return_full_context else 0)

    def run(self, inputs: dict[str, np.ndarray], return_full_context: bool = False) -> dict:
        """The graph's outputs (or its full context) for ``inputs``, as ``execute_onnx``."""
        context = dict(self._context)
        for name in self._fresh:  # a new buffer per run, as execute_onnx's context has
            context[name] = np.zeros_like(context[name])
        for name, value in inputs.items():
            if name in context:
                if context[name].shape != value.shape:
                    raise ValueError(f"Shape mismatch for provided input {name}: found "
                                     f"{context[name].shape} expected {value.shape} ")
                context[name] = value
        done: set[str] = set()
        for index in self._per_input:
            self._execute(index, context, done)
        if return_full_context:
            return context
        return {x.name: context[x.name] for x in self.graph.output}
