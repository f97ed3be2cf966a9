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


SERIES = (("data-type bound", "bits_datatype", "#c7c7c7"),
          ("A2Q L1 bound", "bits_a2q_bound", "#9ecae1"),
          ("A2Q+ L1 bound", "bits_a2q_plus_bound", "#4292c6"),
          ("proven (exact range)", "bits_exact_range", "#2ca02c"))


def _failed(r) -> bool:
    """The layer fails its target: the exact range or its variant's L1 bound exceeds P."""
    return r.target_holds is False or getattr(r, "bound_holds", None) is False


def accumulator_widths_plot(report, title: str | None = None):
    """Grouped bars per accumulating node of a qonnx accumulator report: the widths needed by the
    data types alone, the A2Q and A2Q+ L1 bounds and the exact range (proven), with the target P
    as a black line across the layer's bars (its value under the layer's name). A layer that
    fails its target has its proven bar drawn red and a note above it. The legend is built from
    fixed handles (its colours never follow the data) and sits outside the axes."""
    import numpy as np

    plt = pyplot()
    x = np.arange(len(report))
    width = 0.8 / len(SERIES)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(report) + 4.5), 4.2))
    for i, (_, key, color) in enumerate(SERIES):
        values = [getattr(r, key) for r in report]
        colors = [VIOLATION_COLOR if key == "bits_exact_range" and _failed(r) else color
                  for r in report]
        bars = ax.bar(x + (i - (len(SERIES) - 1) / 2) * width, values, width, color=colors)
        ax.bar_label(bars, fontsize="x-small", padding=1)
    _draw_targets(ax, report, x)
    rotate = len(report) > 4
    ax.set_xticks(x, [_tick_label(r) for r in report], rotation=30 if rotate else 0,
                  ha="right" if rotate else "center")
    ax.set_xlim(-0.6, len(report) - 0.4)
    ax.set_xlabel("layer (accumulating node) and its target P")
    ax.set_ylabel("signed accumulator bits")
    integer_ticks(ax.yaxis)
    widths = [getattr(r, key) for r in report for _, key, _ in SERIES]
    widths += [r.target_bits for r in report if r.target_bits is not None]
    ax.set_ylim(max(0, min(widths) - 4), max(widths) + 4)  # the differences are a few bits
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or _title(report))
    ax.legend(handles=_legend_handles(report), loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0, fontsize="small")
    fig.tight_layout()
    return fig


def _tick_label(r) -> str:
    name = r.layer or r.node
    return f"{name}\nP={r.target_bits}" if r.target_bits is not None else f"{name}\nno target"


def _legend_handles(report) -> list:
    """One handle per series in its own colour, the target line, and (when a layer fails) the
    red of a failed proven width: independent of which bar is red."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=color, label=name) for name, _, color in SERIES]
    if any(r.target_bits is not None for r in report):
        handles.append(Line2D([], [], color="black", linewidth=2.0, label="target P"))
    if any(_failed(r) for r in report):
        handles.append(Patch(color=VIOLATION_COLOR, label="proven width, target VIOLATED"))
    return handles


def _draw_targets(ax, report, x: Sequence[float]) -> None:
    """Target P as a black line across each layer's bars; a red note above a layer that fails
    it (which width exceeds P)."""
    for xi, r in zip(x, report, strict=True):
        if r.target_bits is None:
            continue
        ax.hlines(r.target_bits, xi - 0.45, xi + 0.45, colors="black", linewidth=2.0, zorder=3)
        if _failed(r):
            need = (f"needs {r.bits_exact_range}" if r.target_holds is False else
                    f"{r.variant} bound {_bound(r)}")
            top = max(getattr(r, key) for _, key, _ in SERIES)
            ax.text(xi, max(top, r.target_bits) + 1.0, f"VIOLATED\n{need} > P={r.target_bits}",
                    ha="center", va="bottom", fontsize="x-small", color=VIOLATION_COLOR,
                    fontweight="bold")


def _bound(r) -> int:
    return r.bits_a2q_plus_bound if r.variant == "a2q+" else r.bits_a2q_bound


def _title(report) -> str:
    bad = sum(_failed(r) for r in report)
    checked = sum(r.target_bits is not None for r in report)
    if bad:
        return f"Accumulator widths: {bad} of {checked} targets VIOLATED"
    if not checked:
        return "Accumulator widths (no targets: nothing checked)"
    return f"Accumulator widths: {checked} of {len(report)} targets checked, all hold"
