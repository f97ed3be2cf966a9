"""Every measured figure the README and the documentation pages (docs/*.md) quote comes from a
committed results file a benchmark wrote (``benchmarks/results/*.json``), and agrees with it.

The figures are registered below, one entry per figure or table, each with the page that shows it
(``page``, relative to the repository root):

- :class:`Figure`: a regular expression over the page whose groups are the numbers as printed,
  the results file, and a function of the parsed JSON returning the expected strings (one per
  group), formatted the way the page prints them. The regular expression must match exactly
  once, so a figure cannot silently disappear or be quoted twice with different values.
- :class:`Table`: a Markdown table, found by the heading it follows, whose rows are keyed by their
  first ``key_columns`` cells; a function of the JSON returns the expected cells of each row key.
  Every row on the page must be among them and equal cell by cell.

To register another section's figures: commit the benchmark's JSON under benchmarks/results, then
append ``Figure(...)``/``Table(...)`` entries to ``FIGURES`` with the page's text as a regex and a
lambda reading the JSON (``fmt`` helpers below). An entry whose results file does not exist fails,
it is not skipped. (The FINN LUT table of docs/benchmarks.md is checked in tests/test_finn_flow.py.)
"""

from __future__ import annotations

import importlib.util
import json
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS = "docs/benchmarks.md"
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)]


def page_text(page: str) -> str:
    return (ROOT / page).read_text()


@dataclass(frozen=True)
class Figure:
    """Numbers in a page's prose (regex groups) and the JSON values they must equal."""

    name: str
    pattern: str
    results: str
    expected: Callable[[dict], tuple[str, ...] | str]
    page: str = BENCHMARKS


@dataclass(frozen=True)
class Table:
    """A page's Markdown table and the cells it must hold, by row key."""

    name: str
    heading: str
    results: str
    rows: Callable[[dict], dict[tuple[str, ...], list[str]]]
    key_columns: int = 1
    page: str = BENCHMARKS


def benchmark(name: str) -> types.ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (its table functions make the pages'
    tables from the committed results)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def f2(x: float) -> str:
    return f"{round(x, 2) + 0.0:.2f}"  # + 0.0: -0.00 prints as 0.00


def pct(x: float, digits: int = 2) -> str:
    """A fraction as a percentage with ``digits`` decimals."""
    return f"{100 * x:.{digits}f}"


def thousands(n: int) -> str:
    return f"{n:,}"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


# ----------------------------------------------------------------------------------------------
# accumulator_simulation.json (benchmarks/accumulator_simulation.py)


def _simulation_rows(d: dict) -> dict[tuple[str, ...], list[str]]:
    rows = {}
    for r in d["accuracy"]:
        p = "–" if r["P"] is None else str(r["P"])
        events = "–" if "overflow_events" not in r else thousands(r["overflow_events"])
        rows[(r["method"], p, r["accumulator"])] = [pct(r["accuracy"]), events]
    return rows


def _acc(d: dict, method: str, accumulator: str) -> float:
    (row,) = [r for r in d["accuracy"] if r["method"] == method and r["accumulator"] == accumulator]
    return row["accuracy"]


def _cost(d: dict, mode: str, digits: int = 2) -> str:
    return f"{d['cost']['modes'][mode]['ratio']:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# accuracy_vs_accumulator*.json (benchmarks/accuracy_vs_accumulator.py)

FLOAT_LABEL = {"float": "float (no quantization)"}


def _mean_std(cell: dict) -> str:
    return f"{cell['mean']:.2f} ± {cell['std']:.2f}"


def _accuracy_rows(d: dict) -> dict[tuple[str, ...], list[str]]:
    bits = [str(b) for b in d["settings"]["bits"]]
    rows = {}
    for method, cells in d["summary"].items():
        if method == "float":
            rows[(FLOAT_LABEL[method],)] = [_mean_std(cells["float"])] + ["″"] * (len(bits) - 1)
        else:
            rows[(method,)] = [_mean_std(cells[b]) for b in bits]
    return rows


def _of_float(d: dict, method: str, p: str) -> str:
    return f"{100 * d['summary'][method][p]['mean'] / d['summary']['float']['float']['mean']:.1f}"


def _overflow(d: dict, methods: tuple[str, ...], p: int) -> list[float]:
    return [r["conv2_overflow_rate"] for r in d["rows"]
            if r["method"] in methods and r.get("P") == p]


def _range(values: list[float], digits: int = 0) -> tuple[str, str]:
    return f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"


# ----------------------------------------------------------------------------------------------
# espcn_psnr.json (benchmarks/espcn_psnr.py)

ESPCN_STAGES = {"bilinear upsampling": "bilinear_baseline", "bicubic upsampling": "bicubic_baseline",
                "float ESPCN": "float", "Brevitas, A2Q+": "brevitas",
                "QONNX file (qonnx, float32)": "qonnx_float32", "exact evaluation": "exact"}


def _espcn_psnr_rows(d: dict) -> dict[tuple[str, ...], list[str]]:
    p, n = d["psnr_db"], thousands(d["setup"]["test_images"])
    q, acc = d["qonnx_float32_vs_exact"], d["accelerator_vs_exact"]
    against_exact = {"brevitas": "not compared pixel by pixel",
                     "qonnx_float32": f"{thousands(q['output_pixels'])} pixels in "
                                      f"{thousands(q['images'])} images",
                     "exact": "(the reference)"}
    rows = {(label,): [n, f2(p[key]), f2(p[key] - p["exact"]) if key in against_exact else "–",
                       against_exact.get(key, "–")]
            for label, key in ESPCN_STAGES.items()}
    a = d["psnr_db_on_accelerator_images"]
    rows[("FINN accelerator (hls-arith)",)] = [
        thousands(acc["images"]), f2(a["finn_accelerator"]), f2(a["finn_accelerator"] - a["exact"]),
        f"{thousands(acc['pixels_differing'])} of {thousands(acc['pixels'])} "
        f"({thousands(acc['images_bit_exact'])}/{thousands(acc['images'])} images bit-exact)"]
    return rows


def _espcn_width_rows(d: dict) -> dict[tuple[str, ...], list[str]]:
    return {(w["layer"],): [w["finn_node"], "–" if w["target_bits"] is None else str(w["target_bits"]),
                            str(w["bits_set"]), str(w["finn_bits"]), str(w["bits_exact"])]
            for w in d["layers"]}


PLAIN = ("plain QAT", "plain QAT (float init)")
EP = ("ours A2Q, EP-init", "ours A2Q+, EP-init")

# ----------------------------------------------------------------------------------------------
# shipped_networks.json (benchmarks/shipped_networks.py), verification_cost.json


def _shipped_rows(d: dict) -> dict[tuple[str, ...], list[str]]:
    rows = {}
    for name, n in d["networks"].items():
        bits = [layer["bits"] for layer in n["layers"]]
        targets = sorted({layer["target_bits"] for layer in n["layers"] if layer["target_bits"]})
        v = n["verification"]
        checked = " / ".join(f"{v[k]['bit_exact']}/{v[k]['inputs']}"
                             for k in ("random", "real", "extreme"))
        s = n["seconds"]
        rows[(name,)] = [
            ", ".join(map(str, targets)) or "–", n["targets_proven"], f"{min(bits)}–{max(bits)}",
            f"{n['lut_set']:,} / {n['lut_int32']:,}", n["exact_thresholds"], checked,
            n["layer_extremes_ok"], str(s["finn_steps"]), str(s["finn_flow_steps"]),
            str(s["verification"]), "–" if n["ratio_verification_to_finn_steps"] is None
            else f"{n['ratio_verification_to_finn_steps']:.2f}"]
    return rows


FIGURES: list[Figure | Table] = [
    Table("accuracy at P on Fashion-MNIST", "### Accuracy at P bits on Fashion-MNIST",
          "accumulator_simulation.json", _simulation_rows, key_columns=3),
    Figure("benchmarks row: simulation cost",
           r"\| int16-wrap ([\d.]+)x, int12-wrap ([\d.]+)x, int12-sat ([\d.]+)x, "
           r"fp12-e4m7 ([\d.]+)x, fp12-e4m7-c16 ([\d.]+)x",
           "accumulator_simulation.json",
           lambda d: tuple(_cost(d, m) for m in ("int16-wrap", "int12-wrap", "int12-sat",
                                                  "fp12-e4m7", "fp12-e4m7-c16"))),
    Figure("plain QAT with a wrapping 12-bit accumulator",
           r"collapses with a wrapping P-bit accumulator\s+\((\d+)% at 12 bits",
           "accumulator_simulation.json",
           lambda d: pct(_acc(d, "plain QAT", "int12-wrap"), 0)),
    Table("accuracy vs accumulator width", "## Accuracy vs accumulator width",
          "accuracy_vs_accumulator.json", _accuracy_rows),
    Figure("accuracy benchmark settings",
           r"Quantized models: (\d+) steps of batch (\d+) \(about a\s+third of an epoch\); "
           r"float: (\d+) epochs; EP-init rows start from the float model of the same seed, with\s+"
           r"the A2Q penalty ([\de.-]+)\.",
           "accuracy_vs_accumulator.json",
           lambda d: (str(d["settings"]["steps"]), str(d["settings"]["batch_size"]),
                      str(d["settings"]["float_epochs"]), f"{d['penalty_weight_ep_rows']:.0e}"
                      .replace("e-03", "e-3"))),
    Figure("accuracy benchmark seeds", r"mean ± std over (\d+) seeds\. Results in",
           "accuracy_vs_accumulator.json", lambda d: str(d["settings"]["seeds"])),
    Figure("accuracy benchmark wall time", r"\(([\d.]+) min on 2 cores, 2 processes",
           "accuracy_vs_accumulator.json", lambda d: minutes(d["wall_seconds"])),
    Figure("benchmarks row: accuracy benchmark wall time",
           r"see \[below\]\(#accuracy-vs-accumulator-width-fashion-mnist-w4a4-cnn\) \(([\d.]+) min, "
           r"2 processes",
           "accuracy_vs_accumulator.json", lambda d: minutes(d["wall_seconds"])),
    Figure("A2Q+/A2Q EP-init at P = 12 vs float",
           r"A2Q\+ EP-init at P = 12 reaches ([\d.]+)% of float \(A2Q: ([\d.]+)%\)",
           "accuracy_vs_accumulator.json",
           lambda d: (_of_float(d, "ours A2Q+, EP-init", "12"),
                      _of_float(d, "ours A2Q, EP-init", "12"))),
    Figure("EP-init and plain QAT at P = 8",
           r"EP-init keeps\s+(\d+)–(\d+)% at P = 8, where unconstrained QAT on an 8-bit wrapping "
           r"accumulator gets (\d+)–(\d+)%",
           "accuracy_vs_accumulator.json",
           lambda d: (*_range([d["summary"][m]["8"]["mean"] for m in EP]),
                      *_range([d["summary"][m]["8"]["mean"] for m in PLAIN]))),
    Figure("conv2 overflow rates without the constraint",
           r"rarely overflows at 10 bits \(at most ([\d.]+)% of outputs in any run\); it falls\s+"
           r"apart at 8 bits \((\d+)–(\d+)% of outputs overflow\)",
           "accuracy_vs_accumulator.json",
           lambda d: (f"{100 * max(_overflow(d, PLAIN, 10)):.2f}",
                      *_range([100 * v for v in _overflow(d, PLAIN, 8)]))),
    Figure("longer EP-init run", r"\(`--bits 32 12 --steps 480 .*?--tag ep_long`, ([\d.]+) min\) "
           r"A2Q\+ EP-init at P = 12 reaches ([\d.]+ ± [\d.]+)% = ([\d.]+)% of float",
           "accuracy_vs_accumulator_ep_long.json",
           lambda d: (minutes(d["wall_seconds"]), _mean_std(d["summary"]["ours A2Q+, EP-init"]["12"]),
                      f"{100 * d['summary']['ours A2Q+, EP-init']['12']['mean'] / _float_mean():.1f}")),
    Figure("README: the headline figure",
           r"mean over (\d+) seeds\), A2Q\+ with Euclidean-projection init\s+keeps ([\d.]+)% test accuracy "
           r"with an 8-bit accumulator, guaranteed, where the same network trained\s+without the "
           r"constraint gets ([\d.]+)% \(([\d.]+)% from a float init\) on a wrapping 8-bit "
           r"accumulator; at\s+P = 12 it reaches ([\d.]+)% of float accuracy",
           "accuracy_vs_accumulator.json",
           lambda d: (str(d["settings"]["seeds"]),
                      *(f2(d["summary"][m]["8"]["mean"]) for m in ("ours A2Q+, EP-init", *PLAIN)),
                      _of_float(d, "ours A2Q+, EP-init", "12")),
           page="README.md"),
    Figure("benchmarks row: quantizer overhead",
           r"ours / built-in: CNN A2Q ([\d.]+), A2Q\+ ([\d.]+); QuantLinear K = 256: A2Q ([\d.]+), "
           r"A2Q\+ ([\d.]+); K = 1024: A2Q ([\d.]+), A2Q\+ ([\d.]+); K = 4096: A2Q ([\d.]+), "
           r"A2Q\+ ([\d.]+) \|",
           "quantizer_overhead.json",
           lambda d: tuple(f2(part["ratio_ours_vs_builtin"][q])
                           for part in (d["cnn"], d["sweep"]["256"], d["sweep"]["1024"],
                                        d["sweep"]["4096"]) for q in ("a2q", "a2q+"))),
    Figure("budgeted rounding cost",
           r"layer at P = 16: A2Q ([\d.]+), A2Q\+ ([\d.]+); at P = 10: A2Q ([\d.]+), A2Q\+ ([\d.]+); "
           r"`QuantLinear` K = 4096 at\s+P = 14: A2Q ([\d.]+), A2Q\+ ([\d.]+)\.",
           "quantizer_overhead_rounding.json",
           lambda d: tuple(f2(d["rounding"][part]["ratio_budgeted_vs_zero"][q])
                           for part in ("cnn_P16", "cnn_P10", "linear_K4096_P14")
                           for q in ("a2q", "a2q+")),
           page="docs/quantizers.md"),
    Table("shipped networks", "## Brevitas's shipped networks", "shipped_networks.json",
          _shipped_rows, page="docs/finn.md"),
    Figure("verification cost on ResNet18",
           r"verification\s+took\s+(\d+)\s+s\s+against\s+FINN's\s+own\s+steps'\s+(\d+)\s+s\s+"
           r"\(ratio\s+([\d.]+);\s+the\s+whole\s+build\s+without\s+verification\s+(\d+)\s+s,\s+"
           r"ratio\s+([\d.]+)\)",
           "verification_cost.json",
           lambda d: (str(d["seconds"]["verification"]), str(d["seconds"]["finn_steps"]),
                      f2(d["ratio_verification_to_finn_steps"]),
                      str(d["seconds"]["finn_steps"]
                          + d["seconds"]["finn_flow_steps_without_verification"]),
                      f2(d["ratio_verification_to_build_without_verification"]))),
    Table("ESPCN PSNR per stage", "### PSNR per stage (ESPCN)", "espcn_psnr.json",
          _espcn_psnr_rows),
    Table("ESPCN accumulator widths", "### Accumulator widths (ESPCN)", "espcn_psnr.json",
          _espcn_width_rows),
    Figure("ESPCN benchmark setup",
           r"trained on (\S+) Fashion-MNIST training images \((\d+) epochs float, then (\d+) epochs "
           r"A2Q\+ fine-tuning\)(?: \([^)]*\))?, evaluated on (\S+) test images, of which (\S+) also "
           r"on the",
           "espcn_psnr.json",
           lambda d: (thousands(d["setup"]["train_images"]), str(d["setup"]["epochs_float"]),
                      str(d["setup"]["epochs_a2q"]), thousands(d["setup"]["test_images"]),
                      thousands(d["setup"]["accelerator_test_images"]))),
    Figure("ESPCN benchmark times",
           r"Times \(2 shared cores\): training ([\d.]+) min \(float ([\d.]+), A2Q\+ ([\d.]+)\), "
           r"FINN build with its own verification ([\d.]+) min, the accelerator on the test "
           r"images ([\d.]+) min",
           "espcn_psnr.json",
           lambda d: tuple(minutes(x) for x in (
               d["timings_s"]["train_float_s"] + d["timings_s"]["train_a2q_s"],
               d["timings_s"]["train_float_s"], d["timings_s"]["train_a2q_s"],
               d["timings_s"]["finn_build_s"], d["timings_s"]["accelerator_verify_s"]))),
    Figure("ESPCN QONNX float32 differences classified",
           r"or unexplained \(a failure\):\s+(\S+) float32 rounding,\s+(\S+) unexplained\.",
           "espcn_psnr.json",
           lambda d: tuple(thousands(sum(d["qonnx_float32_vs_exact"][k].values())) for k in (
               "quantizer_values_float32_rounding", "quantizer_values_unexplained"))),
    Figure("ESPCN accelerator check speed", r"the hls-arith check took ([\d.]+) s per image in this run",
           "espcn_psnr.json",
           lambda d: f"{d['timings_s']['accelerator_verify_s'] / d['setup']['accelerator_test_images']:.2f}"),
    Figure("benchmarks row: export speed",
           r"export \+ report ([\d.]+)x Brevitas's export \(of which qonnx cleanup ([\d.]+)x\); our "
           r"export of Brevitas's own model ([\d.]+)x",
           "export_speed.json",
           lambda d: tuple(f2(d["ratio_vs_brevitas_export"][k])
                           for k in ("export_and_report", "qonnx_cleanup", "export_same_model"))),
]


def _float_mean() -> float:
    """The float reference of the main accuracy run (the ep_long run reuses it)."""
    return json.loads((RESULTS / "accuracy_vs_accumulator.json").read_text()
                      )["summary"]["float"]["float"]["mean"]


def markdown_table(text: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after ``heading`` (header and rule dropped)."""
    start = text.index(heading)
    lines = text[start:].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _load(entry) -> dict:
    path = RESULTS / entry.results
    assert path.is_file(), f"{entry.name}: results file {path} is not committed"
    return json.loads(path.read_text())


@pytest.mark.parametrize("entry", FIGURES, ids=lambda e: e.name)
def test_figures_match_their_results_file(entry):
    data = _load(entry)
    text = page_text(entry.page)
    if isinstance(entry, Table):
        expected = entry.rows(data)
        rows = markdown_table(text, entry.heading)
        assert rows, f"{entry.name}: no table after {entry.heading!r}"
        for row in rows:
            key, cells = tuple(row[:entry.key_columns]), row[entry.key_columns:]
            assert key in expected, f"{entry.name}: {entry.page} row {key} is not in {entry.results}"
            assert cells == expected[key], f"{entry.name}, row {key}"
        return
    matches = list(re.finditer(entry.pattern, text, flags=re.S))
    assert len(matches) == 1, f"{entry.name}: {len(matches)} matches of {entry.pattern!r}"
    want = entry.expected(data)
    want = (want,) if isinstance(want, str) else tuple(want)
    assert matches[0].groups() == want, entry.name


def test_every_committed_plot_has_its_results_file_and_is_shown():
    """Each PNG under benchmarks/results is drawn from a committed JSON and shown on a page (the
    README links it from the repository root, docs pages from docs/); the ep_long plot is only
    quoted in prose."""
    shown = {}
    for page in PAGES:
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", page.read_text()):
            path = (page.parent / target).resolve()
            assert path.is_file(), f"{page.name}: image {target} does not exist"
            shown[path] = page
    for png in RESULTS.glob("*.png"):
        assert png.with_suffix(".json").is_file(), png
        assert png.resolve() in shown or png.stem.endswith("_ep_long"), png


def test_rounding_tables_are_the_committed_results():
    """The benchmarks page's round-to-zero vs budgeted-rounding tables are exactly what the benchmark's own
    table function makes of the committed results (benchmarks/accuracy_vs_accumulator.py
    --study rounding), and the prose figures quoted below them are cells of those tables."""
    bench = benchmark("accuracy_vs_accumulator")
    data = json.loads((RESULTS / "accuracy_vs_accumulator_rounding.json").read_text())
    rows = data["rows"]
    floats = [100 * r["accuracy"] for r in rows if r["method"] == "float"]
    table = bench.rounding_table(bench.summarize_rounding(rows), data["settings"]["bits"],
                                 sum(floats) / len(floats))
    text = page_text(BENCHMARKS)
    assert table.strip() in text
    assert f"({data['wall_seconds'] / 60:.1f} min wall on 2 cores" in text
    section = text.split("### Round-to-zero vs budgeted rounding")[1].split("\n## ")[0]
    prose = section.split("What it shows:")[1]
    cells = set(re.findall(r"(\d+\.\d\d) ± \d+\.\d\d", table))
    for figure in re.findall(r"(?<![\d.])(?<!± )(\d+\.\d\d)%", prose):
        assert figure in cells, figure


def test_ptq_section_is_the_committed_results():
    """docs/ptq.md's comparison with Brevitas's AXE: its table and its per-P statements are exactly
    what benchmarks/ptq_vs_axe.py makes of the committed runs, and the settings in its prose
    (float accuracy and epochs, calibration images, seeds, test images) are the JSON's."""
    bench = benchmark("ptq_vs_axe")
    data = json.loads((RESULTS / "ptq_vs_axe.json").read_text())
    summary = bench.summarize(data["runs"], data["float"]["test_accuracy"])
    text = page_text("docs/ptq.md")
    assert bench.markdown(summary).strip() in text
    assert bench.verdicts(summary).strip() in text
    settings = re.findall(r"float CNN trained (\d+) epochs \(([\d.]+)% on the (\S+) test images\), "
                          r"calibration on ([\d,]+) training images, (\d+) seeds", text)
    assert settings == [(str(data["float"]["epochs"]), pct(data["float"]["test_accuracy"]),
                         thousands(data["settings"]["test_images"]),
                         thousands(data["settings"]["calibration_images"]),
                         str(data["settings"]["seeds"]))]


def test_espcn_accelerator_equals_the_exact_evaluation():
    """The committed ESPCN results say what the docs claim: every accelerator output the benchmark
    evaluated equals the exact evaluation bit for bit (so their PSNRs are equal), every build and
    test-image verification check passed, QONNX's float32 differences from the exact evaluation
    (if any) are all float32 rounding, and the quantized hidden layers are within their target."""
    d = json.loads((RESULTS / "espcn_psnr.json").read_text())
    acc = d["accelerator_vs_exact"]
    assert acc["images"] == d["setup"]["accelerator_test_images"] > 0
    assert acc["bit_exact"] and acc["pixels_differing"] == 0
    assert acc["images_bit_exact"] == acc["images"]
    assert acc["pixels"] == acc["images"] * 28 * 28
    a = d["psnr_db_on_accelerator_images"]
    assert a["finn_accelerator"] == pytest.approx(a["exact"], abs=1e-9)
    checks = d["accelerator_checks"]
    assert checks["verified"] and all(c["ok"] for c in checks["build"] + checks["test_images"])
    assert all(c["ok"] for c in checks["layer_extremes"])
    assert d["qonnx_float32_vs_exact"]["quantizer_values_unexplained"] == {}
    targeted = [w for w in d["layers"] if w["target_bits"] is not None]
    assert targeted and all(w["bits_set"] <= w["target_bits"] for w in targeted)


def test_low_bitwidth_claims_are_the_committed_results():
    """The README's and the benchmarks page's tables of Blumenfeld et al.'s claims are exactly what
    benchmarks/low_bitwidth_finetune.py makes of its committed rows, with the settings the page
    states (seeds, fine-tuning images, test images)."""
    bench = benchmark("low_bitwidth_finetune")
    data = json.loads((RESULTS / "low_bitwidth_finetune.json").read_text())
    settings = data["settings"]
    summary = bench.summarize(data["rows"], settings["tolerance"])
    assert summary == json.loads(json.dumps(data["summary"]))
    assert {r["seed"] for r in data["rows"]} == set(range(settings["seeds"]))
    assert bench.readme_table(summary).strip() in page_text("README.md")
    text = page_text(BENCHMARKS)
    assert bench.tables(summary).strip() in text
    stated = re.findall(r"(\d+) seeds, fine-tuning on ([\d,]+) training images, tested on ([\d,]+) "
                        r"\(cnn\) and ([\d,]+) \(resnet20\) test images", text)
    assert stated == [(str(settings["seeds"]), thousands(settings["finetune_images"]),
                       thousands(settings["test_images"]["cnn"]),
                       thousands(settings["test_images"]["resnet20"]))]
    trained = re.findall(r"Adam ([\d.e-]+), one pass, batch 64; models trained (\d+) epochs on ([\d,]+) "
                         r"images; ([\d.]+) min wall on 2 cores(?: for the last of the runs that "
                         r"made it, which took (\d+) of its (\d+) rows from the runs before)?",
                         text)
    resumed = data.get("rows_from_earlier_runs", 0)
    assert trained == [(repr(float(settings["lr"])), str(settings["epochs"]),
                        thousands(settings["train_images"]), minutes(data["wall_seconds"]),
                        str(resumed) if resumed else "",
                        str(len(data["rows"])) if resumed else "")]


def test_accumulator_speed_table_is_the_committed_results():
    """The benchmarks page's simulation-speed table is exactly what
    benchmarks/accumulator_speed.py makes of its committed results, and each verdict is its
    ratio against its target."""
    bench = benchmark("accumulator_speed")
    data = json.loads((RESULTS / "accumulator_speed.json").read_text())
    assert bench.table(data).strip() in page_text(BENCHMARKS)
    for setup in data["setups"].values():
        for mode in setup["modes"] + setup.get("memory", {}).get("modes", []):
            if mode["ratio"] is not None:
                assert mode["met"] == (mode["ratio"] <= mode["target"]), mode


def test_claims_benchmark_resumes_with_one_row_per_configuration(tmp_path):
    # two runs over one out-dir can both finish a configuration: the summary must count it
    # once (the last row written), or its mean and seed count would be off
    bench = benchmark("low_bitwidth_finetune")
    row = {"network": "cnn", "seed": 0, "stage": "finetuned", "accumulator": "int9-sat",
           "gradient": "ste", "accuracy": 0.5}
    other = dict(row, gradient="immediate", accuracy=0.6)
    partial = tmp_path / "low_bitwidth_finetune.partial.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n"
                               for r in (row, other, dict(row, accuracy=0.7))))
    rows = bench.load_partial(partial)
    assert sorted((r["gradient"], r["accuracy"]) for r in rows) == [("immediate", 0.6),
                                                                  ("ste", 0.7)]
    assert bench.load_partial(tmp_path / "missing.jsonl") == []
