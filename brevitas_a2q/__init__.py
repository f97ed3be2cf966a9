"""brevitas_a2q: accumulator-aware quantization (A2Q, A2Q+) for Brevitas.

Train networks whose integer accumulators provably never overflow at a width chosen per layer,
audit any Brevitas model's accumulators, and export QONNX files that carry those widths.
"""

import warnings

# Brevitas warns on import about an optional CUDA kernel package that nothing here uses
warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")

from brevitas_a2q.audit import accumulator_report
from brevitas_a2q.bounds import (
    datatype_accumulator_bits,
    exact_accumulator_range,
    l1_norm_bound,
    min_accumulator_bits,
)
from brevitas_a2q.export import export_qonnx
from brevitas_a2q.quantizers import A2QPlusWeightQuant, A2QWeightQuant

__version__ = "0.1.0"

__all__ = [
    "A2QPlusWeightQuant",
    "A2QWeightQuant",
    "accumulator_report",
    "datatype_accumulator_bits",
    "exact_accumulator_range",
    "export_qonnx",
    "l1_norm_bound",
    "min_accumulator_bits",
]
