"""``accumulators.json``, a readable summary (``accumulators.md``) and a plot
(``accumulators.png``) of the widths :class:`~finn_flow.steps.accumulators.SetProvenAccumulatorWidths`
set, with FINN's LUT estimates at those widths and at 32 bits."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from brevitas_a2q.io import atomic_output
from finn_flow.steps.accumulators import LayerWidths

__all__ = ["REPORT_FORMAT", "plot_figure", "summary_markdown", "target_verdict", "totals",
           "write_reports"]

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
        below = [w for w in forced if not w.holds_exact_range]
        if below:
            return (f"Widths FORCED on {len(forced)} of {len(layers)} layers "
                    "(--force-accumulator-bits), unproven: BELOW the exact range of "
                    + ", ".join(f"{w.layer or w.finn_node} ({w.datatype}, needs {w.bits_exact} "
                                "bits)" for w in below)
                    + ": these accumulators can overflow (an overflow demonstration); targets "
                    "not checked.")
        return (f"Widths FORCED on {len(forced)} of {len(layers)} layers (--force-accumulator-bits): "
                "each holds its layer's exact range, so none can overflow, but they are not the "
                "proven tightest widths and were not checked against any target.")
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


VERIFICATION_PENDING = (
    "Verification: not run when this report was written (finn_flow.build rewrites this line with "
    "the outcome when the build finishes; a report that still says this comes from a build that "
    "stopped early, or from a step list that does not verify).")


def summary_markdown(layers: Sequence[LayerWidths], extra_totals: dict | None = None,
                     verification: str = VERIFICATION_PENDING) -> str:
    """A table: FINN node <-> Brevitas layer, P, width set, exact-range / L1-bound / data-type
    widths, FINN's own width, LUTs at the width set and at INT32; then the totals, what was
    checked against the targets and ``verification`` (what was verified)."""
    lines = [
        "# Accumulator widths",
        "",
        "| FINN node | Brevitas layer | P | set | exact range | L1 bound | data types | FINN | "
        "LUT set | LUT FINN | LUT INT32 | LUT 32 (uncapped) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in layers:
        mark = "" if not w.forced else " (forced)" if w.holds_exact_range else \
            " (FORCED below exact range)"
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
              "", target_verdict(layers), "", verification, "", INT32_NOTE]
    for key, value in (extra_totals or {}).items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


def _bits_panel(ax, layers: Sequence[LayerWidths], x) -> None:
    """Accumulator bits per layer: exact range, width set (hatched and labelled when forced),
    FINN's width and the data-type bound, with each layer's target P as a dashed line across its
    group."""
    width = 0.2
    forced_below = any(w.forced and not w.holds_exact_range for w in layers)
    set_label = "set (FORCED, unproven)" if forced_below else \
        "set (forced)" if any(w.forced for w in layers) else "set (proven)"
    series = [("exact range", [w.bits_exact for w in layers], "#9e9e9e", None),
              (set_label, [w.bits for w in layers], "#1f77b4",
               "//" if any(w.forced for w in layers) else None),
              ("FINN", [w.finn_bits for w in layers], "#ff7f0e", None),
              ("data types (A2Q Eq. 12)", [w.bits_datatype for w in layers], "#2ca02c", None)]
    for i, (label, values, color, hatch) in enumerate(series):
        bars = ax.bar(x + (i - 1.5) * width, values, width, label=label, color=color,
                      hatch=hatch, edgecolor="black" if hatch else None, linewidth=0.5)
        if hatch:
            for bar, w in zip(bars, layers, strict=True):
                if w.forced and not w.holds_exact_range:
                    bar.set_edgecolor("red")
                    ax.annotate("FORCED", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7, color="red",
                                rotation=90, xytext=(0, 2), textcoords="offset points")
    labelled = False
    for xi, w in zip(x, layers, strict=True):
        if w.target_bits is None:
            continue
        ax.hlines(w.target_bits, xi - 2.2 * width, xi + 2.2 * width, colors="black",
                  linestyles="--", linewidth=2, zorder=4, label=None if labelled else "target P")
        ax.annotate(f"P={w.target_bits}", (xi - 2.2 * width, w.target_bits), fontsize=8,
                    va="bottom", ha="left", xytext=(1, 3), textcoords="offset points", zorder=5,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
        labelled = True
    top = max(max(v for _, values, _, _ in series for v in values),
              max((w.target_bits or 0) for w in layers))
    ax.set(xticks=x, xticklabels=[w.layer or w.finn_node for w in layers],
           ylabel="accumulator bits", ylim=(0, top * 1.25), title="Accumulator widths")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)


LUT_SERIES = (("lut_chosen", "width set"), ("lut_finn", "FINN's width"),
              ("lut_int32", "INT32 (FINN model, capped)"),
              ("lut_int32_uncapped", "32 bits (uncapped)"))


def _lut_panel(ax, layers: Sequence[LayerWidths], x) -> None:
    """FINN's LUT estimates per layer in all four columns of the table (those a layer lacks are
    left out and named in the title)."""
    shown = [(key, label) for key, label in LUT_SERIES
             if all(getattr(w, key) is not None for w in layers)]
    if not shown:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no LUT estimates", ha="center", va="center")
        return
    width = 0.8 / len(shown)
    for i, (key, label) in enumerate(shown):
        ax.bar(x + (i - (len(shown) - 1) / 2) * width, [getattr(w, key) for w in layers], width,
               label=label)
    missing = [label for key, label in LUT_SERIES if (key, label) not in shown]
    title = "FINN LUT estimates" + (f" (no estimate: {', '.join(missing)})" if missing else "")
    ax.set(xticks=x, xticklabels=[w.layer or w.finn_node for w in layers], ylabel="LUTs",
           title=title)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)


def plot_figure(layers: Sequence[LayerWidths]):
    """The figure of ``accumulators.png``: accumulator bits (exact range, width set, FINN's width,
    data-type bound, each target P as a dashed line; forced widths hatched, those below the exact
    range labelled FORCED) and FINN's LUT estimates in the table's four columns, legends below the
    axes, titled with what the widths are (proven, forced, forced below the exact range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(layers))
    fig, (ax_bits, ax_lut) = plt.subplots(1, 2, figsize=(12, 5.2))
    if layers:
        _bits_panel(ax_bits, layers, x)
        _lut_panel(ax_lut, layers, x)
    else:
        for ax in (ax_bits, ax_lut):
            ax.set_axis_off()
        ax_bits.text(0.5, 0.5, "no MVAU/VVAU layer", ha="center", va="center")
    forced = [w for w in layers if w.forced]
    if any(not w.holds_exact_range for w in forced):
        status = "widths FORCED below the exact range: unproven, can overflow"
    elif forced:
        status = "widths forced (hold the exact range; not the proven ones)"
    elif all(w.within_target is not False for w in layers):
        status = "proven widths (exact range of the integer weights)"
    else:
        status = "a proven width EXCEEDS its target P"
    fig.suptitle(f"Accumulators of the FINN build: {status}", fontsize=11)
    fig.tight_layout()
    return fig


def _plot(layers: Sequence[LayerWidths], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = plot_figure(layers)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def write_reports(layers: Sequence[LayerWidths], out_dir: str | Path,
                  extra: dict | None = None,
                  verification: str = VERIFICATION_PENDING) -> dict[str, Path]:
    """Write ``accumulators.json``, ``accumulators.md`` and ``accumulators.png`` into ``out_dir``
    (replacing earlier ones); return their paths. ``verification``: one sentence on what was
    verified (the default says nothing was, yet)."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "accumulators.json", "summary": out_dir / "accumulators.md",
             "plot": out_dir / "accumulators.png"}
    payload = {"format": REPORT_FORMAT, "layers": [w.to_dict() for w in layers],
               "totals": totals(layers), "targets": target_verdict(layers),
               "verification": verification, "note": INT32_NOTE, **(extra or {})}
    with atomic_output(paths["json"], overwrite=True) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    with atomic_output(paths["summary"], overwrite=True) as tmp:
        tmp.write_text(summary_markdown(layers, verification=verification))
    with atomic_output(paths["plot"], overwrite=True) as tmp:
        _plot(layers, tmp)
    return paths
