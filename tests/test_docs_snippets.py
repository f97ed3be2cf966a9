"""Everything the README and the documentation pages (docs/*.md) tell a user to run works as
written.

- Every ```python block runs (fenced at any indentation, e.g. inside a list item): the blocks of one
  page in order, each in a fresh namespace, in one temporary directory per page, so that a block may
  use a file an earlier block of the same page wrote (the README's FINN build of the model its
  quantizer example exported). A page with a block that imports FINN is a ``finn`` and ``slow``
  test, skipped with the reason where FINN cannot be imported.
- Every ``a2q ...`` command in a code block (fenced or indented, with ``\\`` continuations) is
  accepted by the real ``a2q`` parser: subcommand, option names, choices and values. Usage
  synopses (with ``[...]`` or ``|``) are checked for their option names only.
- The cheap commands (``a2q evaluate`` of a demo checkpoint) are run for real.
- ``a2q --help`` and every ``a2q COMMAND --help`` answer in well under a second (measured in a
  subprocess; the bound here is generous for loaded CI machines).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from brevitas_a2q.cli import SUBCOMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)]
TEXTS = {page.relative_to(ROOT).as_posix(): page.read_text() for page in PAGES}
FINN_IMPORT = re.compile(r"^\s*(from|import) (finn|finn_flow)\b", re.M)


def python_blocks(text: str) -> list[str]:
    """The bodies of a page's ```python blocks (dedented: a block may sit inside a list item)."""
    return [textwrap.dedent(body) for _, body in
            re.findall(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M)]


def code_lines(text: str) -> list[str]:
    """Every line of every code block (fenced blocks, and indented blocks outside them), with
    backslash continuations joined."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            lines.append(line.strip())
    joined, current = [], ""
    for line in lines:
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            joined.append(current.strip())
            current = ""
    return joined


def a2q_commands(text: str) -> list[str]:
    """The ``a2q`` command lines of a page's code blocks (comments dropped)."""
    return [line.split("  #")[0].strip() for line in code_lines(text)
            if line.startswith("a2q ")]


ALL_COMMANDS = [c for text in TEXTS.values() for c in a2q_commands(text)]
PAGES_WITH_CODE = [name for name, text in TEXTS.items() if python_blocks(text)]


def _page_param(name: str):
    if any(FINN_IMPORT.search(block) for block in python_blocks(TEXTS[name])):
        return pytest.param(name, id=name, marks=[pytest.mark.finn, pytest.mark.slow])
    return pytest.param(name, id=name)


def test_the_pages_have_what_this_test_checks():
    readme = TEXTS["README.md"]
    assert len(python_blocks(readme)) == 2  # the quantizer example and the FINN build of its model
    assert "```\ngit clone" in readme and "make demo " in readme and "make test " in readme
    assert {"README.md", "docs/quantizers.md", "docs/simulation.md", "docs/finn.md"} <= set(
        PAGES_WITH_CODE)
    assert {c.split()[1] for c in ALL_COMMANDS} >= {"evaluate", "train", "report", "build"}


@pytest.mark.parametrize("name", [_page_param(n) for n in PAGES_WITH_CODE])
def test_python_blocks_run(name, tmp_path, monkeypatch):
    blocks = python_blocks(TEXTS[name])
    if any(FINN_IMPORT.search(b) for b in blocks):
        from finn_flow import finn_available

        ok, reason = finn_available()
        if not ok:
            pytest.skip(f"FINN not importable: {reason}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    for index, code in enumerate(blocks):
        exec(compile(code, f"{name} python block {index + 1}", "exec"), {"__name__": "docs"})


def _option_names(parser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_a2q_command_is_accepted_by_the_parser(command):
    words = shlex.split(command)[1:]
    parser = build_parser()
    if any(w.startswith("[") or w == "|" for w in words):  # a usage synopsis
        sub = parser._subparsers._group_actions[0].choices[words[0]]
        used = {w.strip("[]").split("=")[0] for w in words if w.strip("[").startswith("--")}
        assert used <= _option_names(sub), used - _option_names(sub)
        return
    args = parser.parse_args(words)  # raises SystemExit(2) on any unknown option or bad value
    assert args.command == words[0]


def test_evaluate_commands_run(tmp_path, monkeypatch, capsys):
    """The evaluate commands, as written, on a small stand-in for the demo checkpoint."""
    from brevitas_a2q.train.checkpoint import save_checkpoint
    from brevitas_a2q.train.data import load_digits
    from brevitas_a2q.train.loop import train_epochs
    from brevitas_a2q.train.models import build_cnn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    kwargs = {"quant": "a2q+", "weight_bits": 4, "act_bits": 4, "acc_bits": 12}
    model = build_cnn(**kwargs)
    train, _ = load_digits()
    train_epochs(model, torch.utils.data.Subset(train, range(256)), 1, progress=False)
    monkeypatch.chdir(tmp_path)
    Path("a2q-demo").mkdir()
    save_checkpoint("a2q-demo/model.pt", model, "cnn", kwargs)
    commands = [c for c in ALL_COMMANDS if c.startswith("a2q evaluate a2q-demo/model.pt")]
    assert commands
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
        out = capsys.readouterr().out
        assert "accuracy" in out


def _seconds(*argv: str) -> float:
    exe = Path(sys.executable).with_name("a2q")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "brevitas_a2q.cli"]
    start = time.perf_counter()
    result = subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert "usage: a2q" in result.stdout
    return elapsed


def test_help_is_fast_and_imports_nothing_heavy():
    """``a2q --help`` used to take 10-12 s (torch and Brevitas imported before argparse)."""
    times = {c: _seconds(*([c] if c else []), "--help") for c in ("", *SUBCOMMANDS)}
    assert max(times.values()) < 3.0, times
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, brevitas_a2q.cli as c; c.build_parser(); "
         "print(sorted(m for m in ('torch', 'brevitas', 'qonnx', 'onnx', 'numpy', 'matplotlib') "
         "if m in sys.modules))"], capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr


def test_help_texts_have_no_markup_or_broken_options():
    """No reST markup, no option name split over two lines, one way of showing defaults."""
    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices
    for name, sub in {"": parser, **subs}.items():
        text = sub.format_help()
        assert "``" not in text and ":func:" not in text and ":mod:" not in text, name
        assert not re.search(r"[a-z0-9]-\n", text), name  # "--layer-\nacc-bits", "int12-\nsat"
        assert "default %(" not in text and "(default %" not in text, name
        assert not re.search(r"\(default [^:]", text), (name, re.findall(r"\(default [^)]*", text))
