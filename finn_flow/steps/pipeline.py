"""The A2Q steps of a FINN build and their place in a step list: :func:`insert_a2q_steps`, the
accumulator step (:func:`make_accumulator_step`) and the verification step
(:func:`make_verify_step`). See :mod:`finn_flow.steps` for where each goes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from onnx import helper
from qonnx.core.modelwrapper import ModelWrapper

from brevitas_a2q.analysis.records import AccumulatorRecord, read_records
from brevitas_a2q.errors import A2QInputError
from finn_flow.options import step_a2q_check_folding
from finn_flow.steps.accumulators import FINN_DOMAIN, LayerWidths, SetProvenAccumulatorWidths
from finn_flow.steps.exact_thresholds import step_a2q_record_activation_chains
from finn_flow.steps.report import write_reports
from finn_flow.steps.streamline import (
    step_a2q_check_hw_layers,
    step_a2q_move_scales_past_forks,
    step_a2q_streamline_residual,
)
from finn_flow.steps.subpixel import step_a2q_subpixel_to_deconv
from finn_flow.steps.ties import step_a2q_round_half_even, step_a2q_round_half_even_streamlined
from finn_flow.steps.upstream_rewrites import (
    step_a2q_relabel_for_hw,
    step_a2q_relu_before_unsigned_quant,
)

__all__ = [
    "insert_a2q_steps",
    "make_accumulator_step",
    "make_verify_step",
    "step_a2q_accumulators",
    "step_a2q_prefer_hls",
]

Step = Callable[[ModelWrapper, object], ModelWrapper]


def step_a2q_prefer_hls(model: ModelWrapper, cfg) -> ModelWrapper:
    """Ask FINN's specialization for the HLS variant of every layer (``preferred_impl_style``)."""
    for node in model.graph.node:
        if node.domain == FINN_DOMAIN:
            for a in [a for a in node.attribute if a.name == "preferred_impl_style"]:
                node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("preferred_impl_style", "hls"))
    return model


def _records(model: ModelWrapper, cfg) -> list[AccumulatorRecord]:
    """The export records, from the model's metadata (FINN's passes keep graph metadata) or, for
    a dataflow partition, from the parent model FINN saved beside it."""
    try:
        records = read_records(model)
        if not records:
            parent = Path(cfg.output_dir) / "intermediate_models" / "dataflow_parent.onnx"
            if parent.exists():
                records = read_records(ModelWrapper(str(parent)))
    except ValueError as err:
        raise A2QInputError(f"accumulator records of the model: {err}") from err
    return records


def _check_all_records_matched(records: list[AccumulatorRecord],
                               layers: list[LayerWidths]) -> list[str]:
    """Every recorded layer with a target must have become an MVAU/VVAU whose width was set
    (records with identical integer weights are found by one node); otherwise raise naming the
    layers. Returns the layers without a target that no node matched: nothing was checked for
    them, which the report says, and nothing needed to be."""
    found = {r.fingerprint for r in records if r.layer in {w.layer for w in layers}}
    missing = [r for r in records if r.fingerprint not in found and r.target_bits is not None]
    if missing:
        names = ", ".join(f"{r.layer!r} ({r.op_type} node {r.node!r} at export)" for r in missing)
        raise A2QInputError(
            f"no FINN MVAU/VVAU was found for the recorded layer(s) {names}: FINN left them "
            "outside the accelerator or changed their integer weights, so their accumulator width "
            "was not set or checked. See intermediate_models/ for where they went (a layer "
            "without a quantized input, or a graph FINN could not streamline)")
    return [r.layer for r in records if r.fingerprint not in found]


def make_accumulator_step(force_bits: int | None = None, lut_estimates: bool = True,
                          on_result: Callable[[list[LayerWidths], dict], None] | None = None
                          ) -> Step:
    """A ``step_a2q_accumulators`` with options: ``force_bits`` imposes that width on every layer
    without proof (unsafe: to show that a check catches overflow); ``lut_estimates`` adds FINN's
    LUT estimates at the width set, at FINN's width, at INT32 and at 32 bits uncapped;
    ``on_result(layers, report_paths)`` receives what the step found."""

    def step_a2q_accumulators(model: ModelWrapper, cfg) -> ModelWrapper:
        from qonnx.transformation.infer_datatypes import InferDataTypes

        from finn_flow.luts import lut_estimate, uncapped_lut_estimate

        records = _records(model, cfg)
        part = cfg._resolve_fpga_part()
        estimator = (lambda node, _model: lut_estimate(node, part)) if lut_estimates else None
        transform = SetProvenAccumulatorWidths(records, force_bits=force_bits,
                                               lut_estimator=estimator)
        model = model.transform(transform).transform(InferDataTypes())
        unmatched = _check_all_records_matched(records, transform.layers)
        if lut_estimates:
            nodes = {n.name: n for n in model.graph.node}
            for w in transform.layers:
                w.lut_int32_uncapped = uncapped_lut_estimate(nodes[w.finn_node], 32, part)
        reports = write_reports(transform.layers, cfg.output_dir,
                                extra={"records": len(records), "forced_bits": force_bits,
                                       "unmatched_layers_without_target": unmatched})
        if on_result is not None:
            on_result(transform.layers, reports)
        return model

    return step_a2q_accumulators


step_a2q_accumulators = make_accumulator_step()
step_a2q_accumulators.__doc__ = ("Proven accumulator widths for every MVAU/VVAU, checked against "
                                 "the recorded targets; reports in cfg.output_dir.")


def make_verify_step(verify_sets: dict, qonnx_model: ModelWrapper,
                     on_result: Callable | None = None,
                     executors: Sequence[str] = ("cppsim",)) -> Step:
    """``step_a2q_verify_<executors>``: the dataflow graph executed by each of ``executors``
    (``"hls-arith"``: :func:`finn_flow.verify.verify_hls_arith`, a model of finn-hlslib's
    arithmetic that runs wherever FINN does; ``"cppsim"``: :func:`finn_flow.verify.verify_cppsim`,
    the compiled HLS code) compared bit-exactly with FINN's exact execution and the QONNX model on
    each input set of ``verify_sets``, plus every MVAU/VVAU alone at its accumulators' extremes
    (:func:`finn_flow.verify.verify_layer_extremes` under hls-arith, and
    :func:`finn_flow.verify.cppsim_layer_extremes` with cppsim). ``on_result(results, plan,
    layer_extremes)`` receives the outcome (``plan``: cppsim's per-layer plan, empty without
    cppsim). Place it after ``step_generate_estimate_reports``."""
    executors = tuple(executors)
    unknown = [e for e in executors if e not in ("cppsim", "hls-arith")]
    if unknown or not executors:
        raise A2QInputError(f"unknown verification executor(s) {unknown or executors}; choose "
                            "from cppsim, hls-arith")

    def step_a2q_verify(model: ModelWrapper, cfg) -> ModelWrapper:
        from finn_flow.verify.executors import (
            cppsim_layer_extremes,
            reference_outputs,
            verify_cppsim,
            verify_hls_arith,
            verify_layer_extremes,
        )

        out = Path(cfg.output_dir)
        reference = reference_outputs(out, verify_sets, qonnx_model)
        extremes = verify_layer_extremes(model, out)
        results, plan, hls_outputs = [], [], {}
        if "hls-arith" in executors:  # cheap, and the model of what cppsim then compiles
            results += verify_hls_arith(model, out, verify_sets, qonnx_model, reference,
                                        extremes, hls_outputs)[0]
        if "cppsim" in executors:
            cpp_results, plan = verify_cppsim(model, out, verify_sets, qonnx_model, reference,
                                              hls_outputs or None)
            results += cpp_results
            extremes += cppsim_layer_extremes(model, out)
        if on_result is not None:
            on_result(results, plan, extremes)
        return model

    step_a2q_verify.__name__ = "step_a2q_verify_" + "_".join(
        e.replace("-", "_") for e in sorted(executors, key=("hls-arith", "cppsim").index))
    return step_a2q_verify


def _name(step) -> str:
    return step if isinstance(step, str) else getattr(step, "__name__", "")


def insert_a2q_steps(steps: Sequence, *, accumulators: Step = step_a2q_accumulators,
                     prefer_hls: Step | None = step_a2q_prefer_hls,
                     verify: Step | None = None,
                     streamline_forks: Step | None = step_a2q_move_scales_past_forks,
                     streamline: Step | None = step_a2q_streamline_residual,
                     check: Step | None = step_a2q_check_hw_layers,
                     ties: Step | None = step_a2q_round_half_even,
                     ties_streamlined: Step | None = step_a2q_round_half_even_streamlined,
                     subpixel: Step | None = step_a2q_subpixel_to_deconv,
                     chains: Step | None = step_a2q_record_activation_chains,
                     unsigned_quant: Step | None = step_a2q_relu_before_unsigned_quant,
                     hw_labels: Step | None = step_a2q_relabel_for_hw,
                     folding_check: Step | None = step_a2q_check_folding) -> list:
    """A FINN step list with ours inserted: ``unsigned_quant`` (a ReLU in front of unsigned
    identity quantizers, so that both FINNs convert them alike, :mod:`finn_flow.steps.upstream_rewrites`),
    ``subpixel`` (sub-pixel convolutions as transposed
    convolutions, :mod:`finn_flow.steps.subpixel`) and ``chains`` (what the exact integer
    thresholds of :mod:`finn_flow.steps.exact_thresholds` are derived from) before
    ``step_qonnx_to_finn``,
    ``prefer_hls`` before ``step_specialize_layers``,
    ``accumulators`` after the last ``step_minimize_bit_width``, ``verify`` after
    ``step_generate_estimate_reports``; where the list has FINN's ``step_streamline``, the
    residual/deconvolution streamlining ``streamline_forks`` before it and ``streamline`` after it
    (both no-ops for a graph without forks, joins and transposed convolutions; a list with its own
    streamlining gets neither), and where it has ``step_create_dataflow_partition``, ``check``
    before it; where it has
    ``step_qonnx_to_finn``, ``ties`` after it, and where it has
    ``step_convert_to_hw``, ``hw_labels`` and then ``ties_streamlined`` before it (float
    constants and threshold layouts labelled as FINN+ leaves them, on both FINNs,
    :mod:`finn_flow.steps.upstream_rewrites`; round half to even, :mod:`finn_flow.steps.ties`);
    where it has ``step_apply_folding_config``, ``folding_check``
    before it (the folding file's PE/SIMD against FINN's graph, :mod:`finn_flow.options`). Steps
    of ours already in ``steps`` are not added twice.
    Raises :class:`~brevitas_a2q.errors.A2QInputError` if an anchor step is missing."""
    out = list(steps)
    names = [_name(s) for s in out]
    for step, anchor, after in ((unsigned_quant, "step_qonnx_to_finn", False),
                                (subpixel, "step_qonnx_to_finn", False),
                                (chains, "step_qonnx_to_finn", False),
                                (streamline_forks, "step_streamline", False),
                                (streamline, "step_streamline", True),
                                (check, "step_create_dataflow_partition", False),
                                (ties, "step_qonnx_to_finn", True),
                                (hw_labels, "step_convert_to_hw", False),
                                (ties_streamlined, "step_convert_to_hw", False),
                                (folding_check, "step_apply_folding_config", False)):
        if step is None or _name(step) in names or anchor not in names:
            continue
        out.insert(names.index(anchor) + after, step)
        names = [_name(s) for s in out]
    if prefer_hls is not None and _name(prefer_hls) not in names:
        if "step_specialize_layers" not in names:
            raise A2QInputError("the step list has no step_specialize_layers to put "
                                "step_a2q_prefer_hls before")
        out.insert(names.index("step_specialize_layers"), prefer_hls)
    for step, anchor in ((accumulators, "step_minimize_bit_width"),
                         (verify, "step_generate_estimate_reports")):
        names = [_name(s) for s in out]
        if step is None or _name(step) in names:
            continue
        if anchor not in names:
            raise A2QInputError(f"the step list has no {anchor} to put {_name(step)} after")
        out.insert(len(names) - names[::-1].index(anchor), step)
    return out
