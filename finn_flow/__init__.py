"""finn_flow: FINN builds of brevitas_a2q models with per-layer accumulator widths proven from the
A2Q bound, and bit-exact C++ simulation without Xilinx tools.

FINN itself is optional: :func:`finn_available` says whether it can be used here and why not.
It runs on FINN+ (``finn-plus`` from PyPI) and on upstream FINN dev; :mod:`finn_flow.finn_compat`
holds every difference between them. Our build steps are in :mod:`finn_flow.steps`; the checks of
build options and models against what FINN accepts, run before FINN starts, in
:mod:`finn_flow.options`.
The graph pass (:class:`SetProvenAccumulatorWidths`) and the reports need only qonnx.
"""

from finn_flow.build import BuildResult, build
from finn_flow.demo import demo_build
from finn_flow.environment import FinnStatus, cppsim_available, finn_available
from finn_flow.errors import FinnBuildError, FinnUnavailableError
from finn_flow.finn_compat import FINN_COMMIT, FINN_PLUS_VERSION
from finn_flow.steps.accumulators import LayerWidths, SetProvenAccumulatorWidths

__all__ = [
    "FINN_COMMIT",
    "FINN_PLUS_VERSION",
    "BuildResult",
    "FinnStatus",
    "FinnBuildError",
    "FinnUnavailableError",
    "LayerWidths",
    "SetProvenAccumulatorWidths",
    "build",
    "demo_build",
    "cppsim_available",
    "finn_available",
]
