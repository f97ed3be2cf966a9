"""Plots people look at: ``a2q report --plot`` (title, axis labels, integer bit ticks, the L1-bound
widths, violations marked, legend outside the bars, PNG only) and the benchmarks' replot paths,
which redraw the committed PNGs from the committed JSON without re-running anything."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from brevitas_a2q.analysis.plots import accumulator_widths_plot
from brevitas_a2q.cli.report import load_qonnx, report_model
from brevitas_a2q.export.qonnx import export_qonnx
from brevitas_a2q.train.models import build_cnn

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    torch.manual_seed(0)
    model = build_cnn("a2q+", acc_bits=12, layer_acc_bits={"conv1": 32, "fc": 32})
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 1, 8, 8))
    path = tmp_path_factory.mktemp("plot") / "model.onnx"
    export_qonnx(model.eval(), torch.rand(1, 1, 8, 8), path)
    return path


def test_report_plot_shows_bounds_targets_and_violations(onnx_file):
    report = report_model(load_qonnx(onnx_file), ["conv2=8"])
    fig = accumulator_widths_plot(report)
    ax = fig.axes[0]
    assert "VIOLATED" in ax.get_title()
    assert ax.get_xlabel() and "bits" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"data-type bound", "A2Q L1 bound", "A2Q+ L1 bound", "proven (exact range)",
            "target P", "proven width, target VIOLATED"} <= set(labels)
    assert all(float(t).is_integer() for t in ax.get_yticks())
    legend_box = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
    assert legend_box.x0 >= ax.get_window_extent(fig.canvas.get_renderer()).x1 - 1  # outside
    texts = [t.get_text() for t in ax.texts]
    assert any(t.startswith("VIOLATED\nneeds") and "P=8" in t for t in texts)
    low, high = ax.get_ylim()
    assert low > 0 and high >= 32  # a range that shows the differences and every target


def test_report_plot_legend_keeps_its_colours_when_the_first_layer_fails(onnx_file, tmp_path):
    """The legend is made of fixed handles: "proven (exact range)" stays green when the first
    layer's proven bar is red; the red entry says what red means; every note lies inside the
    axes and each layer's target is under its name."""
    from matplotlib.colors import to_hex

    report = report_model(load_qonnx(onnx_file), ["conv1=8"])
    fig = accumulator_widths_plot(report)
    fig.savefig(tmp_path / "first-fails.png")
    ax = fig.axes[0]
    legend = ax.get_legend()
    colours = {text.get_text(): to_hex(handle.get_facecolor())
               for text, handle in zip(legend.get_texts(), legend.legend_handles, strict=True)
               if hasattr(handle, "get_facecolor")}
    assert colours["proven (exact range)"] == "#2ca02c"
    assert colours["proven width, target VIOLATED"] == "#d62728"
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    for text in ax.texts:
        extent = text.get_window_extent(renderer)
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and extent.y1 <= box.y1, text
    assert [t.get_text() for t in ax.get_xticklabels()] == ["conv1\nP=8", "conv2\nP=12",
                                                           "fc\nP=32"]


def test_report_plot_writes_png_only_to_png(onnx_file, tmp_path, capsys):
    from brevitas_a2q.cli import main

    png = tmp_path / "w.png"
    assert main(["report", str(onnx_file), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert main(["report", str(onnx_file), "--plot", str(tmp_path / "w.pdf")]) == 2
    assert "must end in .png" in capsys.readouterr().err
    assert not (tmp_path / "w.pdf").exists()


def _benchmark(name: str):
    """A benchmark script as a module (in-process: torch is already imported here)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stem", ["accumulator_simulation", "accuracy_vs_accumulator",
                                  "accuracy_vs_accumulator_ep_long"])
def test_benchmark_replot_from_committed_json(tmp_path, capsys, stem):
    shutil.copy(ROOT / "benchmarks" / "results" / f"{stem}.json", tmp_path)
    if stem == "accumulator_simulation":
        _benchmark(stem).plot_only(tmp_path)
    else:
        tag = ["--tag", "ep_long"] if stem.endswith("ep_long") else []
        assert _benchmark("accuracy_vs_accumulator").main(
            ["--plot-only", "--out-dir", str(tmp_path), *tag]) == 0
    assert "redrew" in capsys.readouterr().out
    assert (tmp_path / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.json", f"{stem}.png"]
