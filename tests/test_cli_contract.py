"""What every ``a2q`` command promises, through the real entry point in a subprocess: a closed
output pipe is a quiet exit, Ctrl-C is 130 at any point, ``--verbose`` adds the traceback to a
one-line error, piped output keeps its order with a subprocess's; and the records a QONNX file
carries are refused as bad input (exit 2, file and record named) when corrupt, never reported as
holding or violated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from brevitas_a2q.export.qonnx import export_qonnx
from brevitas_a2q.train.models import build_cnn

A2Q = Path(sys.executable).with_name("a2q")
ROOT = Path(__file__).resolve().parents[1]


def a2q_command() -> list[str]:
    return [str(A2Q)] if A2Q.exists() else [sys.executable, "-m", "brevitas_a2q.cli"]


def env() -> dict:
    """The environment of a subprocess: this checkout first on the path, and Python's default
    buffering (a user's shell has no PYTHONUNBUFFERED)."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return {**base, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*a2q_command(), *argv], capture_output=True, text=True,
                          timeout=timeout, env=env())


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def model_onnx(tmp_path_factory) -> Path:
    """An untrained A2Q+ CNN (targets 12/12/12) exported with its accumulator records."""
    torch.manual_seed(0)
    model = build_cnn("a2q+", acc_bits=12)
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 1, 8, 8))
    path = tmp_path_factory.mktemp("contract") / "model.onnx"
    export_qonnx(model.eval(), torch.rand(1, 1, 8, 8), path)
    return path


# ----------------------------------------------------------------------------------------------
# the entry point


def test_closed_pipe_is_a_quiet_exit(model_onnx):
    """``a2q report M --json | head -1``: the reader is gone before the JSON is written; the
    command stops quietly (exit 141, as a Unix tool stopped by SIGPIPE), no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader went away before the command wrote anything
    proc = subprocess.run([*a2q_command(), "report", str(model_onnx), "--json"],
                          stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
                          env=env())
    os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


def test_interrupt_at_any_point_exits_130():
    """Ctrl-C before the command runs (while the parser imports the subcommands) is 130 with one
    line, like Ctrl-C inside a command."""
    script = textwrap.dedent("""
        import sys
        import brevitas_a2q.cli as cli

        def interrupted():
            raise KeyboardInterrupt

        cli.build_parser = interrupted
        sys.exit(cli.main(["report", "model.onnx"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env())
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "a2q: interrupted"


@pytest.mark.parametrize("where", ["after", "before"])
def test_verbose_adds_the_traceback_to_a_one_line_error(tmp_path, where):
    missing = str(tmp_path / "absent.onnx")
    plain = run("report", missing)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip() == f"a2q report: error: model {missing} does not exist"
    argv = ("report", missing, "--verbose") if where == "after" else \
        ("--verbose", "report", missing)
    verbose = run(*argv)
    assert verbose.returncode == 2, verbose.stderr
    assert "Traceback (most recent call last)" in verbose.stderr
    assert "A2QInputError" in verbose.stderr
    assert last_line(verbose.stderr) == plain.stderr.strip()


def test_piped_output_keeps_its_order_with_a_subprocess():
    """What a command prints before it starts a subprocess (FINN's tools) comes first in the
    pipe, although Python block-buffers a piped stdout."""
    script = textwrap.dedent("""
        import subprocess, sys
        import brevitas_a2q.cli.report as report
        from brevitas_a2q.cli import main

        def run(args):
            print("results of a2q")
            subprocess.run([sys.executable, "-c", "print('log of a subprocess')"], check=True)
            return 0

        report.run = run
        sys.exit(main(["report", "model.onnx"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["results of a2q", "log of a subprocess"]


def test_help_states_the_ranges_the_code_takes(tmp_path):
    """``--help`` says 2 to 64 for accumulator targets: 2 and 64 are taken, 1 and 65 refused."""
    from brevitas_a2q.cli import main
    from brevitas_a2q.cli.report import parse_targets

    for command, option in (("train", "--acc-bits P"), ("train", "--layer-acc-bits"),
                            ("report", "--target")):
        help_text = " ".join(run(command, "--help").stdout.split("\noptions:")[1].split())
        start = help_text.index(option)
        assert "2 to 64" in help_text[start:start + 200], (command, option)
    assert parse_targets(["2", "conv1=64"]) == (2, {"conv1": 64})
    for bad in ("1", "conv1=65"):
        with pytest.raises(ValueError, match="between 2 and 64"):
            parse_targets([bad])
    for bits in ("1", "65"):
        assert main(["train", "--acc-bits", bits, "--out", str(tmp_path / "o")]) == 2
    evaluate_help = " ".join(run("evaluate", "--help").stdout.split())
    assert "P from 2 to 52" in evaluate_help


# ----------------------------------------------------------------------------------------------
# corrupt accumulator records: bad input, never a verdict


def corrupt(model_onnx: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``model_onnx`` whose records metadata is ``edit(payload)`` (a str is written
    as it is)."""
    from qonnx.core.modelwrapper import ModelWrapper

    from brevitas_a2q.analysis.records import METADATA_KEY

    model = ModelWrapper(str(model_onnx))
    payload = json.loads(model.get_metadata_prop(METADATA_KEY))
    edited = edit(payload)
    model.set_metadata_prop(METADATA_KEY, edited if isinstance(edited, str) else json.dumps(edited))
    path = tmp_path / "corrupt.onnx"
    model.save(str(path))
    return path


def set_first_target(value):
    def edit(payload):
        payload["layers"][0]["target_bits"] = value
        return payload
    return edit


def drop_first(key):
    def edit(payload):
        del payload["layers"][0][key]
        return payload
    return edit


CORRUPTIONS = [
    ("not JSON", lambda p: "{not json", "is not valid JSON"),
    ("unknown version", lambda p: {**p, "format": "brevitas_a2q.accumulators/9"},
     "has format 'brevitas_a2q.accumulators/9'"),
    ("a JSON list", lambda p: [1, 2], "is a JSON list, not an object"),
    ("layers not a list", lambda p: {**p, "layers": "x"}, "'layers' must be a list"),
    ("non-numeric target", set_first_target("twelve"), "target_bits must be"),
    ("negative target", set_first_target(-3), "got -3"),
    ("absurd target", set_first_target(1e6), "got 1000000.0"),
    ("target below 2", set_first_target(1), "from 2 to 64, got 1"),
    ("target above 64", set_first_target(65), "from 2 to 64, got 65"),
    ("fractional target", set_first_target(12.5), "got 12.5"),
    ("boolean target", set_first_target(True), "got True"),
    ("missing field", drop_first("fingerprint"), "lacks fingerprint"),
]


@pytest.mark.parametrize("what, edit, needle", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_records_are_bad_input(model_onnx, tmp_path, capsys, what, edit, needle):
    from brevitas_a2q.cli import main

    path = corrupt(model_onnx, tmp_path, edit)
    rc = main(["report", str(path)])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    line = err.strip()
    assert line.startswith(f"a2q report: error: {path}: ") and needle in line, line
    assert "re-export the model" in line  # the fix
    if "target" in what:
        assert "accumulator record 0 (layer 'conv1')" in line
    assert "VIOLATED" not in out and "holds" not in out and "ok:" not in out


def test_corrupt_records_through_the_command(model_onnx, tmp_path):
    """The same through the installed command: exit 2 and one line, not exit 3 with a
    traceback (non-numeric target) nor "VIOLATED" (negative target)."""
    for value in ("twelve", -3):
        path = corrupt(model_onnx, tmp_path, set_first_target(value))
        proc = run("report", str(path))
        assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and f"got {value!r}" in proc.stderr


def test_read_records_raises_input_errors_naming_the_source(model_onnx, tmp_path):
    """The library call (used by finn_flow too) raises A2QInputError, not TypeError."""
    from qonnx.core.modelwrapper import ModelWrapper

    from brevitas_a2q.analysis.records import read_records
    from brevitas_a2q.errors import A2QInputError

    path = corrupt(model_onnx, tmp_path, set_first_target("twelve"))
    with pytest.raises(A2QInputError, match=r"^m\.onnx: accumulator record 0 \(layer 'conv1'\)"):
        read_records(ModelWrapper(str(path)), "m.onnx")
    good = read_records(ModelWrapper(str(model_onnx)))
    assert [r.target_bits for r in good] == [12, 12, 12]
