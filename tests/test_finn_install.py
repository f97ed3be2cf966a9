"""The README's library route: ``pip install 'brevitas-a2q[finn]'`` plus ``--no-deps finn-plus``.
FINN's builder must import with only what that route installs: our dependencies, the ``finn``
extra, and what those require in turn. The venv holds more (the ``dev`` extra, notebooks), so a
subprocess hides every installed distribution outside that set and imports the builder there."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from finn_flow import finn_available

FINN_OK, FINN_REASON = finn_available()
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.finn,
              pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")]

# hides the given top-level modules, as if their distributions were not installed
IMPORT_WITH_HIDDEN = """
import json, sys
hidden = set(json.loads(sys.argv[1]))

class Hidden:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed by the route)")
        return None

sys.meta_path.insert(0, Hidden())
from finn_flow.finn_compat import import_builder
import_builder()
print("imported")
"""


def _installed_by_route() -> set[str]:
    """Distributions the library route installs: ours, the ``finn`` extra, their requirements
    (with the extras asked for) and finn-plus itself (installed without its dependencies)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["finn"]]
    seen: set[tuple[str, frozenset]] = set()
    pending = [(canonicalize_name(r.name), frozenset(r.extras)) for r in todo]
    while pending:
        name, extras = pending.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e})
                                                  for e in extras | {""}):
                continue
            pending.append((canonicalize_name(req.name), frozenset(req.extras)))
    return {name for name, _ in seen} | {"finn-plus", "brevitas-a2q"}


def test_finn_builder_imports_with_only_the_finn_extra():
    route = _installed_by_route()
    hidden = sorted(module for module, dists in md.packages_distributions().items()
                    if not any(canonicalize_name(d) in route for d in dists))
    done = subprocess.run([sys.executable, "-c", IMPORT_WITH_HIDDEN, json.dumps(hidden)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]


def test_psutil_is_declared_in_the_finn_extra():
    """FINN+ imports psutil (finn.transformation.fpgadataflow.simulation_build) without
    declaring it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {canonicalize_name(Requirement(r).name)
             for r in project["optional-dependencies"]["finn"]}
    assert "psutil" in names
