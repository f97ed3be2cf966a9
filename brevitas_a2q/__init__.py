"""brevitas_a2q: accumulator-aware quantization (A2Q, A2Q+) for Brevitas.

Train networks whose integer accumulators provably never overflow at a width chosen per layer,
audit any Brevitas model's accumulators, and export QONNX files that carry those widths.

Subpackages, in the order data flows through them: :mod:`brevitas_a2q.quant` (quantizers and
bounds), :mod:`brevitas_a2q.analysis` (audit, records, QONNX analysis), :mod:`brevitas_a2q.export`
(exact QONNX export), :mod:`brevitas_a2q.sim` (simulated low bit-width accumulators),
:mod:`brevitas_a2q.train` (targets, init, penalty, loops, models, data, checkpoints) and
:mod:`brevitas_a2q.cli` (the ``a2q`` command).

The public names are imported on first use (PEP 562), so that ``import brevitas_a2q.cli`` and
``a2q --help`` do not pay for importing torch and Brevitas.
"""

from __future__ import annotations

import warnings

# Brevitas warns on import about an optional CUDA kernel package that nothing here uses
warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")

from brevitas_a2q._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "A2QBudgetedWeightQuant": "brevitas_a2q.quant.quantizers",
    "A2QPlusBudgetedWeightQuant": "brevitas_a2q.quant.quantizers",
    "A2QPlusWeightQuant": "brevitas_a2q.quant.quantizers",
    "A2QWeightQuant": "brevitas_a2q.quant.quantizers",
    "accumulator_report": "brevitas_a2q.analysis.audit",
    "analyze_accumulators": "brevitas_a2q.analysis.qonnx_analysis",
    "datatype_accumulator_bits": "brevitas_a2q.quant.bounds",
    "evaluate_accuracy": "brevitas_a2q.sim.evaluate",
    "exact_accumulator_range": "brevitas_a2q.quant.bounds",
    "export_qonnx": "brevitas_a2q.export.qonnx",
    "finetune": "brevitas_a2q.sim.evaluate",
    "l1_norm_bound": "brevitas_a2q.quant.bounds",
    "min_accumulator_bits": "brevitas_a2q.quant.bounds",
    "simulate_accumulators": "brevitas_a2q.sim.layers",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
