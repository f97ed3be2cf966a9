"""Finding FINN and preparing what its flow needs on this machine.

FINN is not on PyPI: it is used from a checkout of its repository at the commit pinned here
(:data:`FINN_COMMIT`, ``dev`` branch; it works with qonnx 1.0.0), normally inside the Docker image
this repository's ``Dockerfile`` builds. Everything that imports FINN goes through
:func:`import_finn`, which sets the environment FINN reads at import time (``FINN_ROOT``) and
explains plainly what is missing when FINN cannot be imported.

C++ simulation (cppsim) of FINN's HLS layers needs no Xilinx tools: g++, finn-hlslib, cnpy, the
open-source arbitrary-precision headers (``ap_int.h``; shipped by the ``hls4ml`` wheel) and the few
headers and libraries FINN's compile script names that those lack. :func:`prepare_cppsim` lays them
out as FINN expects to find a Vitis installation (``$VITIS_PATH/include``, two csim libraries).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

from brevitas_a2q.errors import A2QInputError

__all__ = [
    "FINN_COMMIT",
    "FINN_REPOSITORY",
    "FinnUnavailableError",
    "cppsim_available",
    "finn_available",
    "finn_root",
    "import_finn",
    "prepare_cppsim",
]

FINN_REPOSITORY = "https://github.com/Xilinx/finn"
FINN_COMMIT = "73ba5ed64e805cb765dda7e57694338d1917848f"  # dev branch, April 2026
COMPAT_INCLUDE = Path(__file__).parent / "cppsim_compat" / "include"
# FINN derives library names from a Vivado version in $XILINX_VIVADO; 2024.2+ reads $VITIS_PATH.
COMPAT_TOOL_VERSION = "2024.2"
CSIM_LIBRARIES = (
    "lnx64/lib/csim/libhlsmc++-GCC46.so",
    "lnx64/tools/fpo_v7_1/libIp_floating_point_v7_1_bitacc_cmodel.so",
    "lnx64/tools/fpo_v7_1/libgmp.so",
    "lnx64/tools/fpo_v7_1/libmpfr.so",
)

_HOW_TO_GET_FINN = (
    "Use the Docker image (`docker build -t brevitas-a2q .` in this repository, then "
    "`docker run --rm -v $PWD:/work brevitas-a2q build MODEL.onnx --out OUT`), or install FINN "
    f"from a checkout of {FINN_REPOSITORY} at commit {FINN_COMMIT} "
    "(`pip install --no-deps -e <checkout>` plus its Python dependencies; see the README's "
    "developer notes) and set FINN_ROOT to the checkout."
)


class FinnUnavailableError(A2QInputError):
    """FINN (or a part of it the requested step needs) cannot be used on this machine."""


def finn_root() -> Path | None:
    """The FINN checkout: ``$FINN_ROOT`` if set, else the repository the importable ``finn``
    package lives in (``<root>/src/finn``), else None."""
    if os.environ.get("FINN_ROOT"):
        return Path(os.environ["FINN_ROOT"])
    spec = importlib.util.find_spec("finn")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package.parent.parent
    return root if (root / "finn-rtllib").is_dir() or (root / "fetch-repos.sh").exists() else None


def _absent_module(name: str, why: str) -> types.ModuleType:
    """A placeholder for a module FINN imports at module level but the build never uses."""
    module = types.ModuleType(name)

    def __getattr__(attr: str):  # noqa: N807
        raise AttributeError(f"{name}.{attr} is unavailable here ({why})")

    module.__getattr__ = __getattr__
    return module


def _provide_unused_imports() -> None:
    """FINN dev imports two things at module level that its build flow never calls:
    ``onnx.mapping`` (unused in ``finn.transformation.general``; removed in onnx 1.19) and
    ``torchvision.transforms.functional`` (image helpers in ``finn.util.test``; the PyPI
    torchvision does not load beside a CPU-only torch). When they cannot be imported, stand-ins
    that fail on any use are registered, so the rest of FINN imports. Real modules are never
    replaced."""
    try:
        import onnx.mapping  # noqa: F401
    except ImportError:
        import onnx

        onnx.mapping = sys.modules["onnx.mapping"] = _absent_module(
            "onnx.mapping", "removed in onnx 1.19; FINN imports it without using it")
    try:
        import torchvision.transforms.functional  # noqa: F401
    except Exception:  # ImportError, or RuntimeError from a torch/torchvision mismatch
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            sys.modules[name] = _absent_module(
                name, "not importable beside this torch; FINN only uses it for test images")


def _accept_numpy_scalar_attributes() -> None:
    """qonnx 1.0.0's ``CustomOp.set_nodeattr`` rejects numpy scalars (``np.float32`` for a float
    attribute), which FINN dev passes in places (``AbsorbSignBiasIntoMultiThreshold`` sets
    ``out_bias`` from an initializer element). Convert numpy scalars to the equal Python number
    before the check; every other value goes through unchanged. Applied once."""
    import numpy as np
    from qonnx.custom_op.base import CustomOp

    original = CustomOp.set_nodeattr
    if getattr(original, "_a2q_numpy_scalars", False):
        return

    def set_nodeattr(self, name, value):
        if isinstance(value, np.generic):
            value = value.item()
        return original(self, name, value)

    set_nodeattr._a2q_numpy_scalars = True
    CustomOp.set_nodeattr = set_nodeattr


def finn_available() -> tuple[bool, str]:
    """``(True, description)`` if FINN's builder imports, else ``(False, what is missing and
    how to get it)``. Never raises."""
    try:
        import_finn()
    except FinnUnavailableError as err:
        return False, str(err)
    return True, f"FINN at {finn_root()}"


def import_finn() -> types.ModuleType:
    """Import and return ``finn.builder.build_dataflow``, or raise :class:`FinnUnavailableError`
    naming what is missing."""
    if importlib.util.find_spec("finn") is None:
        raise FinnUnavailableError(f"FINN is not installed (no module 'finn'). {_HOW_TO_GET_FINN}")
    root = finn_root()
    if root is None:
        raise FinnUnavailableError(
            "the 'finn' package is importable but its repository was not found; set FINN_ROOT "
            f"to the FINN checkout. {_HOW_TO_GET_FINN}")
    os.environ.setdefault("FINN_ROOT", str(root))
    _provide_unused_imports()
    _accept_numpy_scalar_attributes()
    try:
        import finn.builder.build_dataflow as build_dataflow
    except ImportError as err:
        raise FinnUnavailableError(
            f"FINN at {root} does not import: {err}. It needs its Python dependencies and "
            f"commit {FINN_COMMIT}. {_HOW_TO_GET_FINN}") from err
    return build_dataflow


def _ap_types_dir() -> Path | None:
    """The open-source ``ap_int.h`` headers: ``$A2Q_AP_TYPES`` or the hls4ml package's copy."""
    if os.environ.get("A2Q_AP_TYPES"):
        return Path(os.environ["A2Q_AP_TYPES"])
    spec = importlib.util.find_spec("hls4ml")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "templates/vivado/ap_types"
    return path if path.is_dir() else None


def cppsim_available() -> tuple[bool, str]:
    """Whether FINN's C++ simulation can run here without Xilinx tools, and if not, why."""
    ok, reason = finn_available()
    if not ok:
        return ok, reason
    root = Path(os.environ["FINN_ROOT"])
    missing = []
    if shutil.which("g++") is None:
        missing.append("g++ (apt-get install g++)")
    if not (root / "deps/finn-hlslib/bnn-library.h").exists():
        missing.append(f"finn-hlslib at {root}/deps/finn-hlslib (FINN's fetch-repos.sh puts it "
                       "there)")
    if not (root / "deps/cnpy/cnpy.cpp").exists():
        missing.append(f"cnpy at {root}/deps/cnpy (FINN's fetch-repos.sh puts it there)")
    ap_types = _ap_types_dir()
    if os.environ.get("XILINX_VIVADO") is None and (ap_types is None
                                                    or not (ap_types / "ap_int.h").exists()):
        missing.append("the ap_int.h headers: `pip install --no-deps hls4ml` or set A2Q_AP_TYPES "
                       "to a directory holding ap_int.h")
    if not Path("/usr/include/zlib.h").exists():
        missing.append("zlib headers (apt-get install zlib1g-dev)")
    if missing:
        return False, "C++ simulation needs " + "; ".join(missing)
    return True, "g++ with finn-hlslib and open-source ap_types headers"


def prepare_cppsim(work_dir: str | os.PathLike) -> Path | None:
    """Make FINN's cppsim compile with g++ alone; returns the stand-in tool directory (None when
    real Xilinx tools are configured through ``$XILINX_VIVADO``, which are then used as is).

    FINN compiles each HLS layer with ``-I$VITIS_PATH/include`` and links two Vitis csim libraries
    plus gmp/mpfr from ``$VITIS_PATH/lnx64``; it reads the tool version from ``$XILINX_VIVADO``.
    This lays out ``work_dir/vitis-compat/<version>`` with the ap_types headers, the compatibility
    headers shipped in ``finn_flow/cppsim_compat`` and empty shared libraries under those names
    (cppsim of integer layers calls none of their symbols), and points the variables at it.
    """
    if os.environ.get("XILINX_VIVADO"):
        return None
    ok, reason = cppsim_available()
    if not ok:
        raise FinnUnavailableError(reason)
    tool = Path(work_dir).resolve() / "vitis-compat" / COMPAT_TOOL_VERSION
    include = tool / "include"
    include.mkdir(parents=True, exist_ok=True)
    for source in [*sorted(_ap_types_dir().iterdir()), *sorted(COMPAT_INCLUDE.iterdir())]:
        link = include / source.name
        if not link.exists():
            link.symlink_to(source)
    for library in CSIM_LIBRARIES:
        path = tool / library
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["gcc", "-shared", "-fPIC", "-x", "c", "/dev/null", "-o", str(path)],
                           check=True, capture_output=True)
    os.environ["XILINX_VIVADO"] = str(tool)
    os.environ["VITIS_PATH"] = str(tool)
    os.environ["HLS_PATH"] = str(tool)
    return tool
