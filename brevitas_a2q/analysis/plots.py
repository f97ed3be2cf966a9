"""Figures people look at: accumulator widths per layer (``a2q report --plot``) and shared styling
for the benchmark plots (integer bit ticks, legends outside the data, a y range that shows the
differences)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["accumulator_widths_plot", "integer_ticks", "legend_outside", "pyplot"]

VIOLATION_COLOR = "#d62728"


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def integer_ticks(axis) -> None:
    """Only whole numbers on ``axis`` (bits come in integers)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def legend_outside(ax, **kwargs) -> None:
    """A legend to the right of the axes, where it cannot cover data (plus any handles a plot
    stored in ``ax.legend_handles_extra``)."""
    handles, labels = ax.get_legend_handles_labels()
    for extra in getattr(ax, "legend_handles_extra", []):
        handles.append(extra)
        labels.append(extra.get_label())
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              fontsize="small", **kwargs)


def accumulator_widths_plot(report, title: str | None = None):
    """Grouped bars per accumulating node of a qonnx accumulator report: the widths needed by the
    data types alone, the A2Q and A2Q+ L1 bounds and the exact range (proven), with the target P
    as a black tick; a layer whose proven width exceeds its target is drawn red and labelled."""
    import numpy as np

    plt = pyplot()
    labels = [r.layer or r.node for r in report]
    series = (("data-type bound", "bits_datatype", "#c7c7c7"),
              ("A2Q L1 bound", "bits_a2q_bound", "#9ecae1"),
              ("A2Q+ L1 bound", "bits_a2q_plus_bound", "#4292c6"),
              ("proven (exact range)", "bits_exact_range", "#2ca02c"))
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 4.0), 4.0))
    for i, (name, key, color) in enumerate(series):
        values = [getattr(r, key) for r in report]
        colors = [VIOLATION_COLOR if key == "bits_exact_range" and r.target_holds is False
                  else color for r in report]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, color=colors,
                      label=name)
        ax.bar_label(bars, fontsize="x-small", padding=1)
    _draw_targets(ax, report, x)
    ax.set_xticks(x, labels, rotation=30 if len(labels) > 4 else 0,
                  ha="right" if len(labels) > 4 else "center")
    ax.set_xlim(-0.6, len(labels) - 0.4 + 0.35)  # room for the last "P=" label
    ax.set_xlabel("layer (accumulating node)")
    ax.set_ylabel("signed accumulator bits")
    integer_ticks(ax.yaxis)
    widths = [getattr(r, key) for r in report for _, key, _ in series]
    widths += [r.target_bits for r in report if r.target_bits is not None]
    ax.set_ylim(max(0, min(widths) - 4), max(widths) + 3)  # the differences are a few bits
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or _title(report))
    legend_outside(ax)
    fig.tight_layout()
    return fig


def _draw_targets(ax, report, x: Sequence[float]) -> None:
    """Target P as a black horizontal tick across each layer's bars, labelled; a red note above a
    layer whose proven width exceeds it; 'no target' where there is none."""
    from matplotlib.patches import Patch

    first = True
    for xi, r in zip(x, report, strict=True):
        if r.target_bits is None:
            ax.text(xi, r.bits_datatype + 0.6, "no target", ha="center", va="bottom",
                    fontsize="x-small", color="0.3")
            continue
        ax.hlines(r.target_bits, xi - 0.45, xi + 0.45, colors="black", linewidth=2.0,
                  label="target P" if first else None)
        ax.text(xi + 0.46, r.target_bits, f"P={r.target_bits}", va="center", ha="left",
                fontsize="x-small")
        first = False
        if r.target_holds is False:
            top = max(r.bits_datatype, r.target_bits)
            ax.text(xi, top + 0.9, f"VIOLATED: needs {r.bits_exact_range} > P={r.target_bits}",
                    ha="center", va="bottom", fontsize="x-small", color=VIOLATION_COLOR,
                    fontweight="bold")
    if any(r.target_holds is False for r in report):
        ax.legend_handles_extra = [Patch(color=VIOLATION_COLOR, label="proven width > target")]


def _title(report) -> str:
    bad = sum(r.target_holds is False for r in report)
    checked = sum(r.target_bits is not None for r in report)
    if bad:
        return f"Accumulator widths: {bad} of {checked} targets VIOLATED"
    if not checked:
        return "Accumulator widths (no targets: nothing checked)"
    return f"Accumulator widths: {checked} of {len(report)} targets checked, all hold"
