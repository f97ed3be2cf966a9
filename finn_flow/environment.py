"""Whether FINN and its C++ simulation can be used here, and what cppsim needs without Xilinx tools.

Which FINN is installed (FINN+ from PyPI or upstream FINN dev) and how the two differ is the business
of :mod:`finn_flow.finn_compat`; this module answers "can I build?" and "can I C++-simulate?" with a
:class:`FinnStatus` that says why not.

C++ simulation (cppsim) of FINN's HLS layers needs no Xilinx tools: g++, finn-hlslib, cnpy, the
open-source arbitrary-precision headers (``ap_int.h``; shipped by the ``hls4ml`` wheel) and the few
headers and libraries FINN's compile script names that those lack. :func:`prepare_cppsim` lays them
out as FINN expects to find a Vitis HLS installation (``include/`` and two csim libraries).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

from finn_flow.finn_compat import (
    FINN_COMMIT,
    FinnUnavailableError,
    cnpy_dir,
    detect_finn,
    hlslib_dir,
    hlslib_gaps,
    import_builder,
    set_cppsim_tools,
    xilinx_tools_configured,
)

__all__ = [
    "FINN_COMMIT",
    "FinnStatus",
    "FinnUnavailableError",
    "cppsim_available",
    "finn_available",
    "prepare_cppsim",
]

COMPAT_INCLUDE = Path(__file__).parent / "cppsim_compat" / "include"
# FINN derives library names from a Vivado version in $XILINX_VIVADO; 2024.2+ reads $VITIS_PATH.
COMPAT_TOOL_VERSION = "2024.2"
CSIM_LIBRARIES = (
    "lnx64/lib/csim/libhlsmc++-GCC46.so",
    "lnx64/tools/fpo_v7_1/libIp_floating_point_v7_1_bitacc_cmodel.so",
    "lnx64/tools/fpo_v7_1/libgmp.so",
    "lnx64/tools/fpo_v7_1/libmpfr.so",
)
# FINN packs all thresholds of a layer into one ap_uint (e.g. 8160 bits); the open-source headers
# stop at 1024 bits unless AP_INT_MAX_W is raised (to at most 1 << 15).
AP_INT_MAX_W = 32768


class FinnStatus(NamedTuple):
    """Whether something can be used, and a sentence saying what it is or what is missing.

    Unpacks as ``ok, reason = finn_available()``; in a condition it is ``ok`` itself (a plain
    tuple would always be true)."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def finn_available() -> FinnStatus:
    """Whether FINN's builder imports here (:func:`finn_flow.finn_compat.import_builder`), and if
    not, what is missing and how to get it. Never raises."""
    try:
        import_builder()
        return FinnStatus(True, detect_finn().describe())
    except FinnUnavailableError as err:
        return FinnStatus(False, str(err))


def _ap_types_dir() -> Path | None:
    """The open-source ``ap_int.h`` headers: ``$A2Q_AP_TYPES`` or the hls4ml package's copy."""
    if os.environ.get("A2Q_AP_TYPES"):
        return Path(os.environ["A2Q_AP_TYPES"])
    spec = importlib.util.find_spec("hls4ml")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "templates/vivado/ap_types"
    return path if path.is_dir() else None


def _cppsim_missing() -> list[str]:
    """What C++ simulation lacks here, each with how to get it."""
    missing = []
    if shutil.which("g++") is None:
        missing.append("g++ (apt-get install g++)")
    hlslib = hlslib_dir()
    if not (hlslib / "bnn-library.h").exists():
        missing.append(f"finn-hlslib at {hlslib} (upstream FINN: its fetch-repos.sh puts it there; "
                       "FINN+: `finn deps update` fetches it, or set FINN_DEPS to a folder holding "
                       "finn-hlslib)")
    elif hlslib_gaps(hlslib):
        missing.append(f"a newer finn-hlslib than the one at {hlslib}, which lacks "
                       f"{', '.join(hlslib_gaps(hlslib))} that this FINN's C++ code calls (use the "
                       "commit your FINN pins: fetch-repos.sh upstream, `finn deps update` in FINN+)")
    if cnpy_dir() is None:
        missing.append(f"cnpy at {detect_finn().root}/deps/cnpy (FINN's fetch-repos.sh puts it "
                       "there)")
    ap_types = _ap_types_dir()
    if not xilinx_tools_configured() and (ap_types is None or not (ap_types / "ap_int.h").exists()):
        missing.append("the ap_int.h headers: `pip install --no-deps hls4ml` or set A2Q_AP_TYPES "
                       "to a directory holding ap_int.h")
    if not Path("/usr/include/zlib.h").exists():
        missing.append("zlib headers (apt-get install zlib1g-dev)")
    return missing


def cppsim_available() -> FinnStatus:
    """Whether FINN's C++ simulation can run here without Xilinx tools, and if not, why."""
    status = finn_available()
    if not status:
        return status
    missing = _cppsim_missing()
    if missing:
        return FinnStatus(False, "C++ simulation needs " + "; ".join(missing))
    return FinnStatus(True, f"g++ with finn-hlslib at {hlslib_dir()} and open-source ap_types "
                            "headers")


def _write_ap_common_wrapper(include: Path, ap_types: Path) -> None:
    """``ap_common.h`` that raises ``AP_INT_MAX_W`` before the real header sets its default; the
    other ap_types headers include it by its plain name, so they find this one first."""
    text = (f"// generated by finn_flow: wide ap_uint for packed thresholds\n"
            f"#ifndef AP_INT_MAX_W\n#define AP_INT_MAX_W {AP_INT_MAX_W}\n#endif\n"
            f'#include "{ap_types / "ap_common.h"}"\n')
    path = include / "ap_common.h"
    if path.is_symlink() or (path.exists() and path.read_text() != text):
        path.unlink()
    if not path.exists():
        path.write_text(text)


def prepare_cppsim(work_dir: str | os.PathLike) -> Path | None:
    """Make FINN's cppsim compile with g++ alone; returns the stand-in tool directory (None when
    real Xilinx tools are configured, which are then used as is). Call it inside
    :func:`finn_flow.finn_compat.build_session`, which restores the variables it sets.

    FINN compiles each HLS layer with ``-I<tool>/include`` and links two Vitis csim libraries plus
    gmp/mpfr from ``<tool>/lnx64``. This lays out ``work_dir/vitis-compat/<version>`` with the
    ap_types headers, the compatibility headers shipped in ``finn_flow/cppsim_compat`` and empty
    shared libraries under those names (cppsim of integer layers calls none of their symbols).
    """
    if xilinx_tools_configured():
        return None
    status = cppsim_available()
    if not status:
        raise FinnUnavailableError(status.reason)
    tool = Path(work_dir).resolve() / "vitis-compat" / COMPAT_TOOL_VERSION
    include = tool / "include"
    include.mkdir(parents=True, exist_ok=True)
    ap_types = _ap_types_dir()
    for source in [*sorted(ap_types.iterdir()), *sorted(COMPAT_INCLUDE.iterdir())]:
        link = include / source.name
        if source.name != "ap_common.h" and not link.exists():
            link.symlink_to(source)
    _write_ap_common_wrapper(include, ap_types)
    for library in CSIM_LIBRARIES:
        path = tool / library
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["gcc", "-shared", "-fPIC", "-x", "c", "/dev/null", "-o", str(path)],
                           check=True, capture_output=True)
    set_cppsim_tools(tool)
    return tool
