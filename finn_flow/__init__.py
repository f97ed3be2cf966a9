"""finn_flow: FINN builds of brevitas_a2q models with per-layer accumulator widths proven from the
A2Q bound, and bit-exact C++ simulation without Xilinx tools.

FINN itself is optional: :func:`finn_available` says whether it can be used here and why not.
The graph pass (:class:`SetProvenAccumulatorWidths`) and the reports need only qonnx.
"""

from finn_flow.accumulators import LayerWidths, SetProvenAccumulatorWidths
from finn_flow.build import BuildResult, FinnBuildError, build
from finn_flow.demo import demo_build
from finn_flow.environment import (
    FINN_COMMIT,
    FinnUnavailableError,
    cppsim_available,
    finn_available,
)

__all__ = [
    "FINN_COMMIT",
    "BuildResult",
    "FinnBuildError",
    "FinnUnavailableError",
    "LayerWidths",
    "SetProvenAccumulatorWidths",
    "build",
    "demo_build",
    "cppsim_available",
    "finn_available",
]
