"""finn_flow's FINN build steps and graph rewrites, for any FINN step list.

Owns everything that changes the graph during a build: the accumulator-width pass
(:mod:`.accumulators`), residual/transposed-conv streamlining (:mod:`.streamline`), round-half-even
ties (:mod:`.ties`), refusals before FINN runs (:mod:`.preflight`), the accumulator reports
(:mod:`.report`) and the step list (:mod:`.pipeline`). May import :mod:`brevitas_a2q` (records,
bounds), qonnx and FINN; imports :mod:`finn_flow.verify` only inside the verification step.

FINN build steps are functions ``step(model, cfg) -> model`` that ``DataflowBuildConfig.steps`` may
mix with FINN's step names. Ours:

* :func:`step_a2q_prefer_hls` (before ``step_specialize_layers``): HLS variants for every layer, so
  FINN's LUT model costs the accumulators and the layers can be C++-simulated;
* :func:`step_a2q_accumulators` (after ``step_minimize_bit_width``): every MVAU/VVAU accumulator
  set to its tightest width proven from the A2Q bound and checked against the target P recorded at
  export (:class:`~finn_flow.steps.accumulators.SetProvenAccumulatorWidths`, records read from the
  model's metadata), then ``accumulators.json`` / ``.md`` / ``.png`` in ``cfg.output_dir``;
* a verification step (:func:`make_verify_step`, after ``step_generate_estimate_reports``):
  hls-arith (a model of finn-hlslib's arithmetic, runs wherever FINN does) and/or cppsim;
* from :mod:`finn_flow.steps.streamline`: :func:`~finn_flow.steps.streamline.step_a2q_move_scales_past_forks`
  (before ``step_streamline``) and :func:`~finn_flow.steps.streamline.step_a2q_streamline_residual`
  (after it) for residual forks/joins and transposed convolutions (no-ops for other graphs), and
  :func:`~finn_flow.steps.streamline.step_a2q_check_hw_layers` (before
  ``step_create_dataflow_partition``: refuses, naming them, nodes left without a FINN layer);
* from :mod:`finn_flow.steps.subpixel`: :func:`~finn_flow.steps.subpixel.step_a2q_subpixel_to_deconv`
  (before ``step_qonnx_to_finn``): sub-pixel convolutions (``Conv -> DepthToSpace``) as transposed
  convolutions, their accumulator records following them;
* from :mod:`finn_flow.steps.upstream_rewrites`:
  :func:`~finn_flow.steps.upstream_rewrites.step_a2q_relu_before_unsigned_quant` (before
  ``step_qonnx_to_finn``) and :func:`~finn_flow.steps.upstream_rewrites.step_a2q_relabel_for_hw`
  (before ``step_convert_to_hw``): exact rewrites so that upstream FINN dev and FINN+ build one graph;
* from :mod:`finn_flow.steps.ties`: :func:`~finn_flow.steps.ties.step_a2q_round_half_even` (after
  ``step_qonnx_to_finn``) and :func:`~finn_flow.steps.ties.step_a2q_round_half_even_streamlined` (before
  ``step_convert_to_hw``): thresholds that round half to even as QONNX and Brevitas do.

A custom build script (finn-examples style)::

    from finn.builder import build_dataflow as bd, build_dataflow_config as bdc
    from finn_flow.steps import insert_a2q_steps

    steps = insert_a2q_steps(["step_qonnx_to_finn", "step_tidy_up", my_streamlining,
                              "step_convert_to_hw", "step_create_dataflow_partition",
                              "step_specialize_layers", "step_minimize_bit_width",
                              "step_generate_estimate_reports"])
    cfg = bdc.DataflowBuildConfig(output_dir="out", board="Pynq-Z1", synth_clk_period_ns=10.0,
                                  generate_outputs=[bdc.DataflowOutputType.ESTIMATE_REPORTS],
                                  steps=steps)
    bd.build_dataflow_cfg("model.onnx", cfg)

(:func:`finn_flow.build` does the same with FINN's default steps and also restores the process
state FINN changes; a script calling FINN directly sets up FINN as FINN documents.)
"""

from finn_flow.steps.accumulators import LayerWidths, SetProvenAccumulatorWidths
from finn_flow.steps.pipeline import (
    insert_a2q_steps,
    make_accumulator_step,
    make_verify_step,
    step_a2q_accumulators,
    step_a2q_prefer_hls,
)
from finn_flow.steps.streamline import (
    step_a2q_check_hw_layers,
    step_a2q_move_scales_past_forks,
    step_a2q_streamline_residual,
)
from finn_flow.steps.subpixel import SubPixelToTransposedConv, step_a2q_subpixel_to_deconv
from finn_flow.steps.ties import step_a2q_round_half_even, step_a2q_round_half_even_streamlined

__all__ = [
    "LayerWidths",
    "SetProvenAccumulatorWidths",
    "SubPixelToTransposedConv",
    "insert_a2q_steps",
    "make_accumulator_step",
    "make_verify_step",
    "step_a2q_accumulators",
    "step_a2q_check_hw_layers",
    "step_a2q_move_scales_past_forks",
    "step_a2q_prefer_hls",
    "step_a2q_round_half_even",
    "step_a2q_round_half_even_streamlined",
    "step_a2q_streamline_residual",
    "step_a2q_subpixel_to_deconv",
]
