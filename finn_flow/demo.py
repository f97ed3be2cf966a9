"""One call for demos: a FINN estimate build with proven accumulator widths and, where g++ can,
a bit-exact C++ simulation check, summarized as text. Says plainly what it skipped and why."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from brevitas_a2q.errors import AccumulatorOverflowError
from finn_flow.build import build
from finn_flow.environment import cppsim_available, finn_available
from finn_flow.errors import FinnBuildError

__all__ = ["demo_build"]


def demo_build(onnx_path: str | os.PathLike, out_dir: str | os.PathLike,
               verify_inputs: np.ndarray | None = None, *, random_count: int = 10,
               overwrite: bool = False) -> tuple[str, bool]:
    """Build ``onnx_path`` (written by ``brevitas_a2q.export.export_qonnx``) with FINN into
    ``out_dir`` (estimate reports, ``accumulators.json/.md/.png``) and verify it on
    ``random_count`` random inputs, ``verify_inputs`` (real inputs, shaped like the model input with
    a leading batch axis) and extreme inputs, and every MVAU/VVAU alone at its accumulators'
    extremes: always with the ``hls-arith`` model of finn-hlslib's arithmetic, and with C++
    simulation where it can run.

    Returns ``(summary_text, ok)``. ``ok`` is False only when a check failed: a layer's exact
    accumulator range exceeds its target P, an accelerator output differs from the QONNX model,
    or FINN's build failed. Without FINN, or without what C++ simulation needs, the text says
    what was skipped and why (:func:`finn_available`, :func:`cppsim_available`) and ``ok`` is True.
    Bad input (missing or unreadable model, non-empty ``out_dir`` without ``overwrite``) raises
    :class:`~brevitas_a2q.errors.A2QInputError` as :func:`finn_flow.build` does.
    """
    ok, reason = finn_available()
    if not ok:
        return f"FINN build SKIPPED (FINN is not importable here): {reason}", True
    cpp_ok, cpp_reason = cppsim_available()
    try:
        result = build(onnx_path, out_dir, verify=("hls-arith", "cppsim") if cpp_ok else
                       ("hls-arith",),
                       verify_inputs=verify_inputs, random_count=random_count,
                       overwrite=overwrite)
    except AccumulatorOverflowError as err:
        return f"FINN build STOPPED, accumulator check failed: {err}", False
    except FinnBuildError as err:
        return f"FINN build FAILED: {err}", False
    lines = [result.reports["summary"].read_text().rstrip(), "", result.verification_summary()]
    if not cpp_ok:
        lines.append(f"C++ simulation SKIPPED: {cpp_reason}")
    lines.append("Bitstream SKIPPED: synthesis needs Vivado; build it in the Docker image with the "
                 "Xilinx tools mounted (README, section \"FINN builds\"): `a2q build MODEL.onnx "
                 "--board Pynq-Z1 --outputs bitfile --out DIR`")
    lines.append(f"FINN's estimate reports (report/estimate_*.json) and accumulators.json/.md/.png "
                 f"in {Path(result.output_dir)}")
    within = all(w.within_target is not False for w in result.layers)
    return "\n".join(lines), within and result.verified is not False
