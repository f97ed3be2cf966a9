"""The one place that knows which FINN is installed: FINN+ from PyPI or upstream FINN ``dev``.

finn_flow runs on two FINNs:

* **FINN+** (``finn-plus`` :data:`FINN_PLUS_VERSION` on PyPI, eki-project/finn-plus), a maintained fork
  of upstream FINN dev that pip users and CI get (the Makefile installs it with ``--no-deps``; its
  runtime dependencies are this package's ``finn`` extra);
* **upstream FINN** ``dev`` at :data:`FINN_COMMIT`, from a checkout (``FINN_ROOT``) or the Docker
  image, where bitstreams are built with the Xilinx tools.

Every difference between them that finn_flow meets is handled here, each with a one-line reason;
the rest of finn_flow calls these functions and never asks which FINN it runs on.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import sys
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from finn_flow.errors import FinnUnavailableError

__all__ = [
    "FINN_COMMIT",
    "auto_folding_config",
    "board_parts",
    "FINN_PLUS_VERSION",
    "FINN_REPOSITORY",
    "FinnInstall",
    "FinnUnavailableError",
    "build_session",
    "config_options",
    "detect_finn",
    "execute_parent",
    "hlslib_dir",
    "hlslib_gaps",
    "high_bit_quant_rounds_half_up",
    "import_builder",
    "infer_thresholding_layer",
    "lut_estimation",
    "FinnStepFailure",
    "run_build",
    "set_cppsim_tools",
    "step_names",
    "step_times",
    "unsigned_identity_quant_supported",
    "vivado_available",
    "xilinx_tools_configured",
    "zynq_boards",
]

FINN_PLUS_VERSION = "1.6.1"
FINN_REPOSITORY = "https://github.com/Xilinx/finn"
FINN_COMMIT = "73ba5ed64e805cb765dda7e57694338d1917848f"  # dev branch, April 2026
PLUS = "finn-plus"
DEV = "finn-dev"

HOW_TO_GET_FINN = (
    f"Install FINN+ with `make demo` or `make test` (they put finn-plus=={FINN_PLUS_VERSION} into "
    f".venv), or by hand: `pip install --no-deps finn-plus=={FINN_PLUS_VERSION}` then "
    "`pip install 'brevitas-a2q[finn]'`. For bitstreams use the Docker image (`docker build -t "
    "brevitas-a2q .`, then `docker run --rm -v $PWD:/work -w /work brevitas-a2q build MODEL.onnx "
    "--out OUT`; README section \"FINN builds\"), or upstream FINN from a checkout of "
    f"{FINN_REPOSITORY} at commit {FINN_COMMIT} with FINN_ROOT set to it."
)


@dataclass(frozen=True)
class FinnInstall:
    """Which FINN is importable: ``flavour`` (``"finn-plus"`` or ``"finn-dev"``) and its root
    (FINN+: the installed ``finn`` package; upstream: the repository checkout)."""

    flavour: str
    version: str
    root: Path

    def describe(self) -> str:
        name = "FINN+" if self.flavour == PLUS else "upstream FINN"
        return f"{name} {self.version} at {self.root}"


def _finn_plus_version() -> str | None:
    try:
        return importlib.metadata.version("finn-plus")
    except importlib.metadata.PackageNotFoundError:
        return None


def _checkout_root() -> Path | None:
    """Upstream FINN keeps its package in ``<checkout>/src/finn``; ``$FINN_ROOT`` wins."""
    if os.environ.get("FINN_ROOT"):
        return Path(os.environ["FINN_ROOT"])
    spec = importlib.util.find_spec("finn")
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package.parent.parent
    return root if (root / "finn-rtllib").is_dir() or (root / "fetch-repos.sh").exists() else None


def detect_finn() -> FinnInstall:
    """The importable FINN, or :class:`FinnUnavailableError` naming what is missing."""
    spec = importlib.util.find_spec("finn")
    if spec is None or not spec.submodule_search_locations:
        raise FinnUnavailableError(f"FINN is not installed (no module 'finn'). {HOW_TO_GET_FINN}")
    plus = _finn_plus_version()
    if plus is not None:
        return FinnInstall(PLUS, plus, Path(next(iter(spec.submodule_search_locations))))
    root = _checkout_root()
    if root is None:
        raise FinnUnavailableError(
            "the 'finn' package is importable but is neither FINN+ (no finn-plus distribution) nor "
            f"an upstream FINN checkout; set FINN_ROOT to the checkout. {HOW_TO_GET_FINN}")
    return FinnInstall(DEV, f"dev (pinned {FINN_COMMIT[:8]})", root)


# --- importing the builder --------------------------------------------------------------------

def _absent_module(name: str, why: str) -> types.ModuleType:
    """A placeholder for a module FINN imports at module level but the build never uses."""
    module = types.ModuleType(name)

    def __getattr__(attr: str):  # noqa: N807
        raise AttributeError(f"{name}.{attr} is unavailable here ({why})")

    module.__getattr__ = __getattr__
    return module


def _provide_unused_imports() -> None:
    """Upstream FINN dev imports ``onnx.mapping`` (removed in onnx 1.19, unused) and
    ``torchvision.transforms.functional`` (test images only; PyPI's torchvision does not load beside
    a CPU torch) at module level: stand-ins that fail on any use, never replacing real modules."""
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
    """qonnx 1.0.0's ``CustomOp.set_nodeattr`` rejects numpy scalars, which FINN dev passes
    (``AbsorbSignBiasIntoMultiThreshold``'s ``out_bias``): convert them to Python numbers first."""
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


class _XsiUnavailable:
    """Stands in for FINN+'s XSI (Vivado simulator) classes where Vivado is not installed."""

    def __init__(self, *args, **kwargs) -> None:
        raise FinnUnavailableError(
            "RTL simulation needs Vivado's XSI (set XILINX_VIVADO, then `finn deps update`); "
            "estimate builds and C++ simulation do not")


def _xsi_placeholders() -> None:
    """FINN+'s builder does ``from finn.xsi import SimEngine`` at import, which demands Vivado
    (``XILINX_VIVADO``) and FINN+ settings: without Vivado, bind stand-ins that fail on use."""
    import finn.xsi

    if os.environ.get("XILINX_VIVADO"):
        return
    for name in getattr(finn.xsi, "_LAZY_NAMES", ()):
        if name not in vars(finn.xsi):
            setattr(finn.xsi, name, _XsiUnavailable)


def import_builder() -> types.ModuleType:
    """Import and return ``finn.builder.build_dataflow``, or raise :class:`FinnUnavailableError`
    naming what is missing. FINN+ raises its own errors and ``OSError`` as well as ImportError."""
    install = detect_finn()
    _provide_unused_imports()
    _accept_numpy_scalar_attributes()
    try:
        if install.flavour == PLUS:
            _xsi_placeholders()
        import finn.builder.build_dataflow as build_dataflow
    except Exception as err:  # ImportError, OSError, FINNUserError: all mean "cannot use FINN"
        hint = HOW_TO_GET_FINN
        if install.flavour == PLUS and os.environ.get("XILINX_VIVADO"):
            hint = ("With XILINX_VIVADO set, FINN+ imports its Vivado simulator interface (XSI) "
                    "and needs it set up (`finn deps update`); unset XILINX_VIVADO for estimate "
                    "builds and C++ simulation, which do not need it.")
        raise FinnUnavailableError(
            f"{install.describe()} does not import: {type(err).__name__}: {err} {hint}") from err
    return build_dataflow


# --- one build: settings, environment and streams, restored afterwards --------------------------

def _plus_settings(build_dir: Path):
    """FINN+ reads its build directory and dependency folder (``$FINN_DEPS``) from a global
    settings object (``finn.util.settings``) that its CLI normally creates."""
    from finn.interface.settings import FINNSettings

    return FINNSettings.init(flow_config=build_dir / "finn_flow.yaml",
                             finn_build_dir=str(build_dir), auto_set_environment_vars=True)


@contextlib.contextmanager
def _no_vivado_root_needed() -> Iterator[None]:
    """FINN+'s ``exit_buildflow`` records the Vivado version from ``XILINX_VIVADO`` and fails when
    it is unset: record "not installed" instead (only while a build runs)."""
    import finn.builder.build_dataflow as build_dataflow

    original = build_dataflow.get_vivado_root
    if os.environ.get("XILINX_VIVADO"):
        yield
        return
    build_dataflow.get_vivado_root = lambda: "Vivado not installed"
    try:
        yield
    finally:
        build_dataflow.get_vivado_root = original


@contextlib.contextmanager
def build_session(build_dir: str | os.PathLike, console: bool = True) -> Iterator[FinnInstall]:
    """Run one FINN build with its generated code in ``build_dir``, and leave the process as it
    was found: ``os.environ``, FINN+'s global settings, ``sys.stdout``/``sys.stderr`` (both FINNs
    redirect them into the build log), the root logger's handlers and ``warnings.showwarning``
    (FINN+ captures warnings into its log). FINN's console output (FINN+ prints its steps and, on a
    failed step, a long traceback) goes to stderr with ``console``, so that a caller's stdout
    (``--json``) holds only the caller's output; without ``console`` it goes only to FINN's build
    log."""
    install = detect_finn()
    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    saved_env = dict(os.environ)
    saved_streams = sys.stdout, sys.stderr
    root_logger = logging.getLogger()
    saved_handlers, saved_level = root_logger.handlers[:], root_logger.level
    saved_showwarning = warnings.showwarning
    settings_module = None
    quiet = None if console else open(os.devnull, "w")  # noqa: SIM115 (closed in finally)
    try:
        os.environ["FINN_BUILD_DIR"] = str(build_dir)
        sys.stdout = sys.stderr if quiet is None else quiet
        if quiet is not None:
            sys.stderr = quiet
        if install.flavour == PLUS:
            import finn.util.settings as settings_module

            saved_settings = settings_module._SETTINGS
            settings = _plus_settings(build_dir)
            settings_module._SETTINGS = settings
            # cppsim compile scripts use an unquoted -I$FINN_CUSTOM_HLS, set by FINN+'s CLI only
            os.environ["FINN_CUSTOM_HLS"] = str(settings.finn_custom_hls)
            with _no_vivado_root_needed():
                yield install
        else:
            os.environ["FINN_ROOT"] = str(install.root)  # upstream reads it for every rtllib path
            yield install
    finally:
        if settings_module is not None:
            settings_module._SETTINGS = saved_settings
        os.environ.clear()
        os.environ.update(saved_env)
        sys.stdout, sys.stderr = saved_streams
        if quiet is not None:
            quiet.close()
        root_logger.handlers[:] = saved_handlers
        root_logger.setLevel(saved_level)
        warnings.showwarning = saved_showwarning


def config_options(build_dataflow_config: types.ModuleType, verbose: bool) -> dict:
    """Extra ``DataflowBuildConfig`` fields: FINN+ mirrors log records of level ERROR and above
    (every warning a build's libraries print) to the console; keep them in the build log unless
    ``verbose``. Upstream FINN has no such field (it logs to the file only)."""
    fields = getattr(build_dataflow_config.DataflowBuildConfig, "__dataclass_fields__", {})
    if "console_log_level" not in fields:
        return {}
    level = build_dataflow_config.LogLevel
    return {"console_log_level": level.INFO if verbose else level.NONE}


@contextlib.contextmanager
def _interrupts_recorded(state: dict) -> Iterator[None]:
    """Ctrl-C (SIGINT) raises ``KeyboardInterrupt`` as usual and also sets
    ``state["interrupted"]``: FINN+'s ``build_dataflow_cfg`` catches ``KeyboardInterrupt`` and
    returns -1 as for a failed step, so the interrupt would otherwise be lost. Only in the main
    thread (where Python delivers signals), and not where SIGINT is ignored."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a process told to ignore Ctrl-C
        yield
        return

    def on_sigint(signum, frame):
        state["interrupted"] = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class FinnStepFailure(Exception):
    """A failed FINN step known only from the traceback FINN printed (upstream FINN catches the
    step's exception, prints its traceback to stderr and returns -1): its last line, e.g.
    ``AssertionError: ...``."""


class _Tee:
    """A text stream writing to ``stream`` and keeping a copy (FINN's console output is left as
    it was; the copy is searched for the failed step's exception)."""

    def __init__(self, stream) -> None:
        self.stream, self.parts = stream, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _printed_exception(text: str) -> FinnStepFailure | None:
    """The exception line closing the last traceback in ``text`` (None without one)."""
    tail = text.rsplit("Traceback (most recent call last):", 1)
    if len(tail) < 2:
        return None
    lines = [line for line in tail[1].splitlines() if line.strip() and not line.startswith(" ")]
    return FinnStepFailure(lines[-1].strip()) if lines else None


def run_build(build_dataflow: types.ModuleType, model_file: str, cfg) -> tuple[int, Exception | None]:
    """``build_dataflow_cfg`` as ``(status, exception)``: upstream FINN returns -1 on a failed step
    and prints the step's traceback (then the exception is a :class:`FinnStepFailure` with its last
    line); FINN+ re-raises the step's exception when it runs under pytest. An interrupt (Ctrl-C) is
    raised as ``KeyboardInterrupt`` whether or not FINN caught it."""
    state: dict = {}
    stderr = _Tee(sys.stderr)
    with _interrupts_recorded(state), contextlib.redirect_stderr(stderr):
        try:
            status, error = build_dataflow.build_dataflow_cfg(model_file, cfg), None
        except Exception as err:  # the failed step's own exception (FINN+ under pytest)
            status, error = -1, err
    if state.get("interrupted") or isinstance(error, KeyboardInterrupt):
        raise KeyboardInterrupt
    if status != 0 and error is None:
        error = _printed_exception("".join(stderr.parts))
    return status, error


# --- what FINN accepts, for checks before a build ----------------------------------------------

def board_parts() -> dict[str, str]:
    """FINN's boards and their FPGA parts (``finn.util.basic.part_map``, the map
    ``DataflowBuildConfig`` resolves ``board`` with)."""
    from finn.util.basic import part_map

    return dict(part_map)


def zynq_boards() -> list[str]:
    """The boards FINN's Zynq shell flow (``ShellFlowType.VIVADO_ZYNQ``, used for bitfiles here)
    can build for (``finn.util.basic.pynq_part_map``)."""
    from finn.util.basic import pynq_part_map

    return list(pynq_part_map)


def step_names() -> list[str]:
    """The step names FINN resolves in a step list (FINN+'s ``build_dataflow_step_lookup``;
    upstream: the ``step_*`` functions of ``finn.builder.build_dataflow_steps``)."""
    import finn.builder.build_dataflow_steps as steps

    lookup = getattr(steps, "build_dataflow_step_lookup", None)
    if lookup:
        return list(lookup)
    return [name for name in vars(steps) if name.startswith("step_")
            and callable(getattr(steps, name))]


def vivado_available() -> bool:
    """Whether Vivado is set up for the outputs that need it (stitched IP, bitfiles): both FINNs
    read ``$XILINX_VIVADO`` and call ``vivado`` from the PATH."""
    import shutil

    return bool(os.environ.get("XILINX_VIVADO")) and shutil.which("vivado") is not None


# --- what the flow calls ---------------------------------------------------------------------

def execute_parent(parent_path: str, child_path: str, inputs, return_full_ctx: bool = False):
    """FINN's ``execute_parent`` (``finn.util.test`` upstream; moved to ``finn.util.execution`` in
    FINN+)."""
    try:
        from finn.util.execution import execute_parent as run
    except ImportError:
        from finn.util.test import execute_parent as run
    return run(parent_path, child_path, inputs, return_full_ctx=return_full_ctx)


def lut_estimation(inst, fpgapart: str) -> int:
    """A layer's ``lut_estimation``: FINN+ takes the FPGA part, upstream takes no argument."""
    if "fpgapart" in inspect.signature(inst.lut_estimation).parameters:
        return int(inst.lut_estimation(fpgapart))
    return int(inst.lut_estimation())


def hlslib_dir() -> Path:
    """finn-hlslib as FINN compiles against it: FINN+ ``$FINN_DEPS/finn-hlslib`` (its settings'
    dependency folder), upstream ``$FINN_ROOT/deps/finn-hlslib``."""
    install = detect_finn()
    if install.flavour == PLUS:
        from finn.interface.settings import FINNSettings

        settings = FINNSettings.init(flow_config=Path.cwd() / "finn_flow.yaml",
                                     auto_set_environment_vars=False)
        return Path(settings.finn_deps) / "finn-hlslib"
    return install.root / "deps" / "finn-hlslib"


def cnpy_dir() -> Path | None:
    """cnpy, which cppsim links: bundled with FINN+ (its npy2stream templates), in
    ``$FINN_ROOT/deps/cnpy`` upstream (None there if FINN's fetch-repos.sh has not run)."""
    install = detect_finn()
    if install.flavour == PLUS:
        return install.root / "templates" / "npy2stream"
    path = install.root / "deps" / "cnpy"
    return path if (path / "cnpy.cpp").exists() else None


def auto_folding_config(output_dir: Path) -> Path | None:
    """The folding FINN chose for ``target_fps``: in the output directory upstream, under
    ``report/`` in FINN+ (None if the build wrote none)."""
    for path in (output_dir / "auto_folding_config.json",
                 output_dir / "report" / "auto_folding_config.json"):
        if path.exists():
            return path
    return None


def step_times(output_dir: Path) -> dict[str, float]:
    """Seconds per build step, as FINN recorded them in ``time_per_step.json``: in the output
    directory upstream, under ``report/`` in FINN+ (empty if the build wrote none)."""
    import json

    for path in (output_dir / "time_per_step.json", output_dir / "report" / "time_per_step.json"):
        if path.exists():
            return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
    return {}


def hlslib_gaps(hlslib: Path) -> list[str]:
    """What FINN's own C++ stream templates call that ``hlslib`` does not declare. FINN+ bundles
    npy2stream templates that call ``unflatten`` (finn-hlslib's ``flatten.hpp`` from 2025 on, the
    commit FINN+ pins); upstream FINN dev's code generators need ``flatten.hpp`` itself."""
    install = detect_finn()
    needs = {"flatten.hpp": ["flatten"]}
    if install.flavour == PLUS:
        template = install.root / "templates" / "npy2stream" / "npy2apintstream.hpp"
        if template.exists() and "unflatten(" in template.read_text(errors="replace"):
            needs["flatten.hpp"].append("unflatten")
    gaps = []
    for header, names in needs.items():
        path = hlslib / header
        text = path.read_text(errors="replace") if path.exists() else ""
        gaps += [f"{name} ({header})" for name in names if f" {name}(" not in text]
    return gaps


def infer_thresholding_layer():
    """FINN's ``InferThresholdingLayer`` class (MultiThreshold -> Thresholding): FINN+ moved it to
    ``convert_to_hw.thresholding``; upstream keeps it in ``convert_to_hw_layers``."""
    try:
        from finn.transformation.fpgadataflow.convert_to_hw.thresholding import (
            InferThresholdingLayer,
        )
    except ImportError:
        from finn.transformation.fpgadataflow.convert_to_hw_layers import InferThresholdingLayer
    return InferThresholdingLayer


def _finn_plus_installed() -> bool:
    """Whether the importable FINN is FINN+ (False without FINN)."""
    try:
        return detect_finn().flavour == PLUS
    except FinnUnavailableError:
        return False


def high_bit_quant_rounds_half_up() -> bool:
    """Whether FINN turns activation ``Quant`` nodes wider than its MultiThreshold limit (8 bits)
    into hardware that rounds half up: FINN+ 1.6.1's ``InferRequantLayer`` does (``floor(x + 0.5)``);
    upstream dev leaves them unconverted. Without FINN: False."""
    return _finn_plus_installed()


def unsigned_identity_quant_supported() -> bool:
    """Whether FINN converts an unsigned identity ``Quant`` (not after a ReLU) into thresholds:
    FINN+ 1.6.1's ``QuantIdentityHandler`` does (level offset 0); upstream FINN dev's raises "FINN
    only supports signed Quant nodes for identity activations". Without FINN: False (the stricter)."""
    return _finn_plus_installed()


def xilinx_tools_configured() -> bool:
    """Whether real Xilinx HLS tools are set up for cppsim: FINN+ compiles with ``$XILINX_HLS``,
    upstream FINN with ``$VITIS_PATH``/``$HLS_PATH`` after reading the version of
    ``$XILINX_VIVADO``."""
    if detect_finn().flavour == PLUS:
        return bool(os.environ.get("XILINX_HLS"))
    return bool(os.environ.get("XILINX_VIVADO"))


def set_cppsim_tools(tool_dir: Path) -> None:
    """Point FINN's cppsim compile flags at a stand-in tool directory (``include/`` and the csim
    libraries under ``lnx64/``); call inside :func:`build_session`, which restores them."""
    if detect_finn().flavour == PLUS:
        os.environ["XILINX_HLS"] = str(tool_dir)
    else:
        for name in ("XILINX_VIVADO", "VITIS_PATH", "HLS_PATH"):
            os.environ[name] = str(tool_dir)
