"""brevitas_a2q: accumulator-aware quantization (A2Q, A2Q+) for Brevitas.

Train networks whose integer accumulators provably never overflow at a width chosen per layer,
audit any Brevitas model's accumulators, and export QONNX files that carry those widths.

The public names are imported on first use (PEP 562), so that ``import brevitas_a2q.cli`` and
``a2q --help`` do not pay for importing torch and Brevitas.
"""

from __future__ import annotations

import importlib
import warnings

# Brevitas warns on import about an optional CUDA kernel package that nothing here uses
warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "A2QBudgetedWeightQuant": "brevitas_a2q.quantizers",
    "A2QPlusBudgetedWeightQuant": "brevitas_a2q.quantizers",
    "A2QPlusWeightQuant": "brevitas_a2q.quantizers",
    "A2QWeightQuant": "brevitas_a2q.quantizers",
    "accumulator_report": "brevitas_a2q.audit",
    "datatype_accumulator_bits": "brevitas_a2q.bounds",
    "exact_accumulator_range": "brevitas_a2q.bounds",
    "export_qonnx": "brevitas_a2q.export",
    "l1_norm_bound": "brevitas_a2q.bounds",
    "min_accumulator_bits": "brevitas_a2q.bounds",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import a public name's module on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'brevitas_a2q' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
