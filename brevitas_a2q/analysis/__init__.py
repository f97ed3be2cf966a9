"""Seeing accumulators: what each layer needs, what it was given, and whether it holds.

Owns the audit of a Brevitas model (:mod:`.audit`: per-layer input bits, weight L1 norms, the exact
range and the width it needs against its target), the same analysis of any QONNX file
(:mod:`.qonnx_analysis`), the accumulator records an export writes into the file's metadata
(:mod:`.records`), and the text tables and plots of both. May import :mod:`brevitas_a2q.quant`; never
:mod:`brevitas_a2q.export`, :mod:`brevitas_a2q.train` or :mod:`brevitas_a2q.cli`.
"""

from __future__ import annotations

from brevitas_a2q._lazy import lazy_exports

# public name -> module that defines it
_EXPORTS = {
    "accumulator_report": "brevitas_a2q.analysis.audit",
    "AccumulatorReport": "brevitas_a2q.analysis.audit",
    "LayerAccumulator": "brevitas_a2q.analysis.audit",
    "AccumulatorAnalysis": "brevitas_a2q.analysis.qonnx_analysis",
    "AnnotateAccumulatorDatatypes": "brevitas_a2q.analysis.qonnx_analysis",
    "analyze_accumulators": "brevitas_a2q.analysis.qonnx_analysis",
    "AccumulatorRecord": "brevitas_a2q.analysis.records",
    "read_records": "brevitas_a2q.analysis.records",
    "write_records": "brevitas_a2q.analysis.records",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
