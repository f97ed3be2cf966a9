"""Which layers of a FINN dataflow graph are C++-simulated, and which FINN executes in Python.

FINN's C++ simulation (cppsim) compiles each HLS layer against finn-hlslib. A layer FINN generates
for a newer finn-hlslib API than the one available cannot be compiled. FINN dev emits, for example,
``MaxPoolFunction<hls::vector<T, PE>>`` and ``Pool_batch<ISIZE, K>(in, out, fxn)`` for ``Pool_hls``,
while finn-hlslib before that change declares ``MaxPoolFunction<T, size>`` and
``Pool_batch<Channels, PE, TotalK>(in, out, fxn, reps)``.

:func:`plan_cppsim` checks, from the declarations in the finn-hlslib headers, that every template
FINN's code for a layer calls accepts the arguments FINN passes (:data:`HLSLIB_API`). A layer that
fails the check and does not accumulate (pooling, not MVAU/VVAU/Thresholding) is converted to its
generic HW layer (``Pool_hls`` -> ``Pool``, domain ``finn.custom_op.fpgadataflow``), whose
``execute_node`` is FINN's own Python model of the layer: FINN treats its RTL layers the same way in
cppsim mode. An accumulating layer that fails it is an error: the check exists to verify them.
Every layer's execution is recorded (:class:`NodeExecution`) and reported with the verification.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from onnx import helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation

from brevitas_a2q.errors import A2QInputError
from finn_flow.finn_compat import hlslib_dir
from finn_flow.steps.accumulators import ACCUMULATING_OPS, FINN_DOMAIN

__all__ = [
    "HLSLIB_API",
    "MUST_SIMULATE",
    "NodeExecution",
    "PythonFallback",
    "TemplateUse",
    "hlslib_dir",
    "missing_api",
    "plan_cppsim",
]

# layers whose C++ simulation is what the verification is for: never replaced by Python
MUST_SIMULATE = (*ACCUMULATING_OPS, "Thresholding")


@dataclass(frozen=True)
class TemplateUse:
    """One use of a finn-hlslib template in FINN's generated code for a layer: ``kind`` ("class"
    or "function"), the name, the number of template arguments given explicitly and (for a
    function) the number of call arguments."""

    header: str
    kind: str
    name: str
    template_args: int
    call_args: int | None = None

    def __str__(self) -> str:
        targs = ", ".join(f"t{i}" for i in range(self.template_args))
        call = "" if self.call_args is None else "(" + ", ".join(
            f"a{i}" for i in range(self.call_args)) + ")"
        return f"{self.name}<{targs}>{call}"


# What FINN emits, per HLS layer and node attribute "Function" (None: the layer has none), from
# finn/custom_op/fpgadataflow/hls/{pool,duplicatestreams}_hls.py in upstream FINN dev at
# finn_flow.FINN_COMMIT and in FINN+ 1.6.1 (FINN+ names the quantized average pool "AvgPool" and
# adds "AccPool").
_POOL_BATCH = TemplateUse("pool.hpp", "function", "Pool_batch", 2, 3)
HLSLIB_API: dict[str, dict[str | None, tuple[TemplateUse, ...]]] = {
    "Pool_hls": {
        "MaxPool": (TemplateUse("pool.hpp", "class", "MaxPoolFunction", 1), _POOL_BATCH),
        "QuantAvgPool": (TemplateUse("pool.hpp", "class", "QuantAvgPoolFunction", 3), _POOL_BATCH),
        "AvgPool": (TemplateUse("pool.hpp", "class", "AvgPoolFunction", 3), _POOL_BATCH),
        "AccPool": (TemplateUse("pool.hpp", "class", "AccPoolFunction", 1), _POOL_BATCH),
    },
    # residual forks: StreamingDup(in, out0, out1) from dup.hpp (finn-hlslib 2025 on)
    "DuplicateStreams_hls": {None: (TemplateUse("dup.hpp", "function", "StreamingDup", 0, 3),)},
}


@dataclass
class NodeExecution:
    """How one dataflow layer runs in the verification: ``"cppsim"`` (compiled with g++) or
    ``"python"`` (FINN's ``execute_node`` of the layer), and why."""

    node: str
    op_type: str  # as built (e.g. Pool_hls), before any conversion
    mode: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _split_top_level(text: str) -> list[str]:
    """Split a template/function parameter list at commas outside <>, () and []."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if "".join(current).strip():
        parts.append("".join(current))
    return [p.strip() for p in parts if p.strip() and p.strip() != "void"]


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def _declarations(text: str, kind: str, name: str) -> list[tuple[list[str], list[str] | None]]:
    """``(template parameters, function parameters)`` of every template declaration of ``name``
    in ``text`` (function parameters None for a class)."""
    out = []
    if kind == "class":
        pattern = rf"template\s*<((?:[^<>]|<[^<>]*>)*)>\s*(?:class|struct)\s+{name}\b(?!\s*<)"
    else:
        pattern = (rf"template\s*<((?:[^<>]|<[^<>]*>)*)>\s*(?:inline\s+)?[\w:<>\s]*?\b{name}"
                   rf"\s*\(((?:[^()]|\([^()]*\))*)\)")
    for match in re.finditer(pattern, text):
        tparams = _split_top_level(match.group(1))
        fparams = _split_top_level(match.group(2)) if kind == "function" else None
        out.append((tparams, fparams))
    return out


def _accepts(tparams: list[str], fparams: list[str] | None, use: TemplateUse) -> bool:
    """Whether a declaration can take ``use``'s explicit template arguments and call arguments.
    Template parameters after the explicit ones must have defaults or be type parameters a call
    can deduce; call parameters beyond the arguments given must have defaults."""
    if use.template_args > len(tparams):
        return False
    for param in tparams[use.template_args:]:
        deducible = fparams is not None and re.match(r"(typename|class)\b", param)
        if "=" not in param and not deducible:
            return False
    if fparams is not None:
        required = sum("=" not in p for p in fparams)
        if not required <= use.call_args <= len(fparams):
            return False
    return True


def missing_api(uses: tuple[TemplateUse, ...], hlslib: Path) -> list[str]:
    """The template uses no declaration in the finn-hlslib headers accepts, each described with
    the declarations found."""
    missing = []
    for use in uses:
        header = hlslib / use.header
        if not header.exists():
            missing.append(f"{use}: {header} does not exist")
            continue
        text = _strip_comments(header.read_text(errors="replace"))
        for other in sorted(hlslib.glob("*.h*")):  # a template may be declared elsewhere
            if other != header:
                text += "\n" + _strip_comments(other.read_text(errors="replace"))
        found = _declarations(text, use.kind, use.name)
        if not any(_accepts(t, f, use) for t, f in found):
            declared = "; ".join(
                f"{use.name}<{', '.join(t)}>" + ("" if f is None else f"({', '.join(f)})")
                for t, f in found) or "not declared"
            missing.append(f"FINN calls {use}, finn-hlslib declares {declared}")
    return missing


def _attr(node, name: str):
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return None


def plan_cppsim(model: ModelWrapper, hlslib: Path | None = None) -> list[NodeExecution]:
    """How each FINN layer of the dataflow graph ``model`` will run under cppsim (see the module
    docstring). Raises :class:`~brevitas_a2q.errors.A2QInputError` if an accumulating or
    thresholding layer cannot be C++-simulated."""
    hlslib = hlslib_dir() if hlslib is None else hlslib
    plan = []
    for node in model.graph.node:
        base = node.op_type.rsplit("_", 1)[0] if node.op_type.endswith(("_hls", "_rtl")) \
            else node.op_type
        if node.domain == FINN_DOMAIN + ".hls":
            uses = HLSLIB_API.get(node.op_type, {}).get(_attr(node, "Function"), ())
            missing = missing_api(uses, hlslib) if uses else []
            if not missing:
                plan.append(NodeExecution(node.name, node.op_type, "cppsim", "HLS layer, g++"))
                continue
            if base in MUST_SIMULATE:
                raise A2QInputError(
                    f"cannot C++-simulate {node.name}: the finn-hlslib at {hlslib} lacks the API "
                    f"FINN generates for it ({'; '.join(missing)}). Use the finn-hlslib commit "
                    "FINN's fetch-repos.sh pins")
            plan.append(NodeExecution(
                node.name, node.op_type, "python",
                "the available finn-hlslib lacks the API FINN generates for it ("
                + "; ".join(missing) + f"); executed as FINN's generic {base} in Python"))
        elif node.domain == FINN_DOMAIN + ".rtl":
            if base in MUST_SIMULATE:
                raise A2QInputError(
                    f"{node.name} is an RTL layer, which cppsim cannot simulate; build the "
                    "accumulating layers as HLS (finn_flow does unless told otherwise)")
            plan.append(NodeExecution(
                node.name, node.op_type, "python",
                f"RTL layer (FINN at this commit has no HLS {base}): FINN's cppsim mode executes "
                f"it with the generic {base} in Python"))
        elif node.domain == FINN_DOMAIN:
            if base in MUST_SIMULATE:
                raise A2QInputError(f"{node.name} was not specialized to an HLS layer")
            plan.append(NodeExecution(node.name, node.op_type, "python",
                                      f"generic {base} (not specialized): FINN executes it in "
                                      "Python"))
        else:
            plan.append(NodeExecution(node.name, node.op_type, "python",
                                      f"not a FINN layer ({node.domain or 'onnx'}): executed by "
                                      "onnxruntime/qonnx"))
    return plan


class PythonFallback(Transformation):
    """Convert the HLS layers ``plan`` executes in Python to their generic HW layer (``X_hls`` ->
    ``X`` in ``finn.custom_op.fpgadataflow``), dropping the HLS-only attributes, so cppsim skips
    them and FINN runs its Python ``execute_node``."""

    def __init__(self, plan: list[NodeExecution]) -> None:
        super().__init__()
        self.names = {e.node for e in plan if e.mode == "python" and e.op_type.endswith("_hls")}

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        from qonnx.custom_op.registry import getCustomOp

        for node in model.graph.node:
            if node.name not in self.names or node.domain != FINN_DOMAIN + ".hls":
                continue
            node.op_type = node.op_type[: -len("_hls")]
            node.domain = FINN_DOMAIN
            known = getCustomOp(node).get_nodeattr_types()
            for a in [a for a in node.attribute if a.name not in known]:
                node.attribute.remove(a)
        return model, False
