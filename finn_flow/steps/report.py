"""``accumulators.json``, a readable summary (``accumulators.md``) and a plot
(``accumulators.png``) of the widths :class:`~finn_flow.steps.accumulators.SetProvenAccumulatorWidths`
set, with FINN's LUT estimates at those widths and at 32 bits."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from brevitas_a2q.io import atomic_output
from finn_flow.steps.accumulators import LayerWidths

__all__ = ["REPORT_FORMAT", "summary_markdown", "target_verdict", "totals", "write_reports"]

REPORT_FORMAT = "finn_flow.steps.accumulators/1"

INT32_NOTE = (
    "FINN's HLS LUT model caps the accumulator at the data-type bound (A2Q Eq. 12), so the INT32 "
    "column costs each layer at min(32, data-type bound) bits, as FINN would; the 32 (uncapped) "
    "column extends FINN's formula, linear in the accumulator bits, to 32 bits "
    "(finn_flow.luts.uncapped_lut_estimate)."
)


def totals(layers: Sequence[LayerWidths]) -> dict:
    """Summed LUT estimates of the accumulating layers (None where a layer has no estimate)."""
    def total(key: str) -> int | None:
        values = [getattr(w, key) for w in layers]
        return None if not values or any(v is None for v in values) else int(sum(values))

    out = {"lut_chosen": total("lut_chosen"), "lut_finn": total("lut_finn"),
           "lut_int32": total("lut_int32"), "lut_int32_uncapped": total("lut_int32_uncapped")}
    if out["lut_chosen"] and out["lut_int32"]:
        out["int32_over_chosen"] = out["lut_int32"] / out["lut_chosen"]
    if out["lut_chosen"] and out["lut_int32_uncapped"]:
        out["int32_uncapped_over_chosen"] = out["lut_int32_uncapped"] / out["lut_chosen"]
    out["all_within_target"] = all(w.within_target is not False for w in layers)
    return out


def target_verdict(layers: Sequence[LayerWidths]) -> str:
    """One sentence saying what was checked against a target, never claiming more: forced widths
    are unproven, layers without a recorded target P are not checked."""
    forced = [w for w in layers if w.forced]
    if forced:
        return (f"Widths FORCED on {len(forced)} of {len(layers)} layers (--force-accumulator-bits): "
                "unproven, not checked against any target; only a verification can tell whether "
                "they overflow.")
    checked = [w for w in layers if w.target_bits is not None]
    if not layers:
        return "No MVAU/VVAU layer in the accelerator: no accumulator width was set or checked."
    if not checked:
        return (f"Targets checked: none of {len(layers)} layers has a target P (the model carries "
                "no accumulator records): the widths set hold the exact range of the integer "
                "weights, but no target was checked.")
    failed = [w.layer or w.finn_node for w in checked if not w.within_target]
    unchecked = len(layers) - len(checked)
    note = f"; {unchecked} layers without a target were not checked" if unchecked else ""
    if failed:
        return (f"Targets checked: {len(checked)} of {len(layers)} layers; VIOLATED by "
                f"{', '.join(failed)}{note}.")
    return (f"Targets checked: {len(checked)} of {len(layers)} layers; every checked width is "
            f"within its target{note}.")


def _cell(value) -> str:
    return "-" if value is None else str(value)


def summary_markdown(layers: Sequence[LayerWidths], extra_totals: dict | None = None) -> str:
    """A table: FINN node <-> Brevitas layer, P, width set, exact-range / L1-bound / data-type
    widths, FINN's own width, LUTs at the width set and at INT32; then the totals."""
    lines = [
        "# Accumulator widths",
        "",
        "| FINN node | Brevitas layer | P | set | exact range | L1 bound | data types | FINN | "
        "LUT set | LUT FINN | LUT INT32 | LUT 32 (uncapped) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in layers:
        mark = " (forced)" if w.forced else ""
        lines.append(
            f"| {w.finn_node} | {_cell(w.layer)} | {_cell(w.target_bits)} | {w.datatype}{mark} | "
            f"{w.bits_exact} | {_cell(w.bits_l1_bound)} | {w.bits_datatype} | {w.finn_datatype} | "
            f"{_cell(w.lut_chosen)} | {_cell(w.lut_finn)} | {_cell(w.lut_int32)} | "
            f"{_cell(w.lut_int32_uncapped)} |")
    tot = totals(layers)
    lines += ["", f"Total LUTs of the accumulating layers: {_cell(tot['lut_chosen'])} at the widths "
              f"set, {_cell(tot['lut_finn'])} at FINN's widths, {_cell(tot['lut_int32'])} at INT32"
              + (f" ({tot['int32_over_chosen']:.2f}x)" if "int32_over_chosen" in tot else "")
              + f", {_cell(tot['lut_int32_uncapped'])} at 32 bits uncapped"
              + (f" ({tot['int32_uncapped_over_chosen']:.2f}x)."
                 if "int32_uncapped_over_chosen" in tot else "."),
              "", target_verdict(layers), "", INT32_NOTE]
    for key, value in (extra_totals or {}).items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


def _plot(layers: Sequence[LayerWidths], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [w.layer or w.finn_node for w in layers]
    x = np.arange(len(layers))
    fig, (ax_bits, ax_lut) = plt.subplots(1, 2, figsize=(11, 4))
    series = [("set", [w.bits for w in layers]), ("FINN", [w.finn_bits for w in layers]),
              ("data types", [w.bits_datatype for w in layers])]
    for i, (label, values) in enumerate(series):
        ax_bits.bar(x + (i - 1) * 0.27, values, 0.27, label=label)
    targets = [w.target_bits for w in layers]
    if any(t is not None for t in targets):
        ax_bits.scatter(x, [np.nan if t is None else t for t in targets], marker="_", s=600,
                        color="black", label="target P", zorder=3)
    ax_bits.set(xticks=x, xticklabels=names, ylabel="accumulator bits")
    ax_bits.legend(fontsize=8)
    if all(w.lut_chosen is not None and w.lut_int32 is not None for w in layers):
        ax_lut.bar(x - 0.2, [w.lut_chosen for w in layers], 0.4, label="width set")
        ax_lut.bar(x + 0.2, [w.lut_int32 for w in layers], 0.4, label="INT32 (FINN model)")
        ax_lut.set(xticks=x, xticklabels=names, ylabel="LUT estimate")
        ax_lut.legend(fontsize=8)
    else:
        ax_lut.set_axis_off()
        ax_lut.text(0.5, 0.5, "no LUT estimates", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def write_reports(layers: Sequence[LayerWidths], out_dir: str | Path,
                  extra: dict | None = None) -> dict[str, Path]:
    """Write ``accumulators.json``, ``accumulators.md`` and ``accumulators.png`` into ``out_dir``
    (replacing earlier ones); return their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "accumulators.json", "summary": out_dir / "accumulators.md",
             "plot": out_dir / "accumulators.png"}
    payload = {"format": REPORT_FORMAT, "layers": [w.to_dict() for w in layers],
               "totals": totals(layers), "note": INT32_NOTE, **(extra or {})}
    with atomic_output(paths["json"], overwrite=True) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    with atomic_output(paths["summary"], overwrite=True) as tmp:
        tmp.write_text(summary_markdown(layers))
    with atomic_output(paths["plot"], overwrite=True) as tmp:
        _plot(layers, tmp)
    return paths
