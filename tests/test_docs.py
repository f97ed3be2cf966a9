"""The documentation: it builds, it maps the code as it is, and nothing the README used to say is
out of reach.

- Sphinx builds docs/ (MyST Markdown, autodoc of every module) without a single warning
  (``-W --keep-going``), and every public function and class has an entry in the API reference.
- The layout page names exactly the subpackages and public modules of ``brevitas_a2q`` and
  ``finn_flow`` on disk, and every ``brevitas_a2q.*`` / ``finn_flow.*`` name in any page's code
  resolves.
- Every public name (``__all__`` of the packages and subpackages) resolves.
- The API reference has one ``automodule`` per module on disk, and no other.
- Every page under docs/ is reachable from the README by links (and toctrees), every relative link
  resolves, every section the README used to hold is a heading of a page, and the README is short.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PACKAGES = ("brevitas_a2q", "finn_flow")
# the packages whose __all__ the docs and the README document
PUBLIC = ("brevitas_a2q", "brevitas_a2q.quant", "brevitas_a2q.analysis", "brevitas_a2q.export",
          "brevitas_a2q.sim", "brevitas_a2q.train", "finn_flow", "finn_flow.steps", "finn_flow.verify")
# every section of the README before the docs existed, and the page that now holds it (as a heading)
MOVED = {
    "Using the quantizers": "quantizers.md",
    "Training helpers": "quantizers.md",
    "Exact bounds": "quantizers.md",
    "Accumulator audit of any Brevitas model": "export.md",
    "Exact QONNX export with accumulator widths": "export.md",
    "Record format": "export.md",
    "Accumulator report of any QONNX model": "export.md",
    "Simulated low bit-width accumulators": "simulation.md",
    "Accuracy at P bits on Fashion-MNIST": "benchmarks.md",
    "FINN builds": "finn.md",
    "LUT estimates": "benchmarks.md",
    "Training at a chosen accumulator width": "cli.md",
    "Accuracy vs accumulator width": "benchmarks.md",
    "Round-to-zero vs budgeted rounding": "benchmarks.md",
    "Notebooks": "development.md",
    "Benchmark": "benchmarks.md",
    "Development": "development.md",
}


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.relative_to(DOCS).parts)


def entries_on_disk(package: str) -> tuple[set[str], set[str]]:
    """(subpackages, public top-level modules) of ``package``, as dotted names, from the files."""
    path = ROOT / package
    subpackages = {f"{package}.{d.name}" for d in path.iterdir() if (d / "__init__.py").is_file()}
    modules = {f"{package}.{f.stem}" for f in path.glob("*.py")
               if f.stem != "__init__" and not f.stem.startswith("_")}
    return subpackages, modules


def all_modules() -> set[str]:
    """Every module and package of ours on disk, private ones and ``__main__`` left out."""
    names = set()
    for package in PACKAGES:
        names.add(package)
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                names.add(info.name)
    return names


# ----------------------------------------------------------------------------------------------
# the build


def _finn_status() -> tuple[bool, str]:
    from finn_flow import finn_available

    return tuple(finn_available())


@pytest.mark.slow
@pytest.mark.finn
def test_docs_build_without_warnings(tmp_path):
    """Autodoc imports every module, finn_flow's FINN-facing ones included, so FINN must import."""
    ok, reason = _finn_status()
    if not ok:
        pytest.skip(f"FINN not importable (autodoc imports finn_flow's FINN modules): {reason}")
    if importlib.util.find_spec("sphinx") is None or importlib.util.find_spec("myst_parser") is None:
        pytest.skip("Sphinx and myst-parser are not installed (the dev extra installs them on "
                    "Python 3.11 and newer)")
    out = tmp_path / "html"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d",
         str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert result.stderr.strip() == "", result.stderr[-5000:]
    for page in pages():
        assert (out / page.relative_to(DOCS).with_suffix(".html")).is_file(), page
    api = "".join((out / "api" / f"{p}.html").read_text() for p in PACKAGES)
    missing = [f"{module}.{name}" for module, name in _documented_objects()
               if f'id="{module}.{name}"' not in api]
    assert not missing, f"public functions/classes without an API entry: {missing}"


def _documented_objects() -> list[tuple[str, str]]:
    """(defining module, name) of every public function and class in :data:`PUBLIC`."""
    found = set()
    for package in PUBLIC:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                found.add((obj.__module__, name))  # by its public name (a step may be a closure)
    return sorted(found)


# ----------------------------------------------------------------------------------------------
# the layout page


def _layout_tables() -> set[str]:
    """The first cells of the layout page's package tables (`` `brevitas_a2q.quant` `` ...)."""
    text = (DOCS / "layout.md").read_text()
    section = text.split("## Packages", 1)[1]
    return set(re.findall(r"^\| `((?:brevitas_a2q|finn_flow)\.\w+)` \|", section, flags=re.M))


def test_layout_page_names_exactly_the_packages_on_disk():
    named = _layout_tables()
    for package in PACKAGES:
        subpackages, modules = entries_on_disk(package)
        mine = {n for n in named if n.startswith(f"{package}.")}
        assert subpackages <= mine, f"subpackages missing from docs/layout.md: {subpackages - mine}"
        assert modules <= mine, f"modules missing from docs/layout.md: {modules - mine}"
        assert mine <= subpackages | modules, f"docs/layout.md names what is not there: " \
                                              f"{mine - subpackages - modules}"


def _resolves(name: str) -> bool:
    """Whether a dotted name is a module of ours or an attribute of one (longest importable prefix,
    then attributes)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
            break
        except ModuleNotFoundError:
            continue
    for attr in parts[cut:]:
        if not hasattr(obj, attr):
            return False
        obj = getattr(obj, attr)
    return True


def _not_python_names() -> set[str]:
    """Strings on the pages that look like dotted names but are data: the metadata key of the
    accumulator records and the format ids (``.../1``) of records and checkpoints."""
    from brevitas_a2q.analysis import records
    from brevitas_a2q.train import checkpoint

    return {records.METADATA_KEY, records.FORMAT.split("/")[0],
            checkpoint.CHECKPOINT_FORMAT.split("/")[0]}


@pytest.mark.parametrize("page", ["README.md", *(p.relative_to(ROOT).as_posix() for p in pages())])
def test_every_dotted_name_in_code_spans_resolves(page):
    """`brevitas_a2q.x.y` / `finn_flow.x` in a page's code (inline or blocks) names something that
    exists, so a moved or renamed module cannot leave a stale name behind in the docs."""
    text = (ROOT / page).read_text()
    fence = re.compile(r"^ *```.*?^ *```", flags=re.S | re.M)
    code = " ".join([*fence.findall(text), *re.findall(r"`([^`]+)`", fence.sub("", text))])
    names = set(re.findall(r"(?<![/\w])(?:brevitas_a2q|finn_flow)(?:\.\w+)+", code))
    stale = sorted(n for n in names - _not_python_names() if not _resolves(n))
    assert not stale, f"{page}: {stale}"


# ----------------------------------------------------------------------------------------------
# public names


@pytest.mark.parametrize("package", PUBLIC)
def test_every_public_name_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__, package
    assert len(set(module.__all__)) == len(module.__all__), f"{package}.__all__ repeats a name"
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
    exported = getattr(module, "_EXPORTS", {})  # lazy re-exports: the module named must define it
    for name, defining in exported.items():
        assert name in vars(importlib.import_module(defining)), f"{package}.{name} -> {defining}"


# ----------------------------------------------------------------------------------------------
# the API reference


def test_api_reference_documents_every_module_and_only_those():
    text = "".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    documented = re.findall(r"^\.\. automodule:: (\S+)$", text, flags=re.M)
    assert len(documented) == len(set(documented)), "a module is documented twice"
    on_disk = all_modules()
    assert set(documented) == on_disk, (f"not documented: {on_disk - set(documented)}; "
                                        f"not on disk: {set(documented) - on_disk}")


# ----------------------------------------------------------------------------------------------
# reachability from the README


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _links(page: Path) -> list[Path]:
    """The local files a page links to: Markdown links and MyST toctree entries."""
    text = page.read_text()
    targets = [t.split("#")[0] for t in LINK.findall(text)
               if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    for block in re.findall(r"^```\{toctree\}\n(.*?)^```", text, flags=re.S | re.M):
        targets += [f"{line.strip()}.md" for line in block.splitlines()
                    if line.strip() and not line.startswith(":")]
    return [(page.parent / t).resolve() for t in targets if t]


def test_every_relative_link_resolves():
    for page in [README, *pages()]:
        for target in _links(page):
            assert target.exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_every_docs_page_is_reachable_from_the_readme():
    seen, todo = set(), [README.resolve()]
    while todo:
        page = todo.pop()
        if page in seen or page.suffix != ".md":
            continue
        seen.add(page)
        todo += [t for t in _links(page) if t.exists()]
    unreachable = [p.relative_to(ROOT) for p in pages() if p.resolve() not in seen]
    assert not unreachable, f"docs pages no link path from README.md reaches: {unreachable}"


@pytest.mark.parametrize("section", MOVED)
def test_each_former_readme_section_is_a_heading_of_a_docs_page(section):
    text = (DOCS / MOVED[section]).read_text()
    headings = re.findall(r"^#+ (.*)$", text, flags=re.M)
    assert any(section.lower() in h.lower() for h in headings), (section, MOVED[section])
    readme_links = {t for t in _links(README)}
    assert (DOCS / MOVED[section]).resolve() in readme_links, f"README.md does not link {MOVED[section]}"


def test_readme_is_short_and_keeps_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^make (\w+)", quick, flags=re.M)
    assert commands == ["demo", "test"], commands
