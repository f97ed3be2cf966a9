"""Sphinx configuration: MyST Markdown pages, an API reference from the docstrings (autodoc).

Build: ``.venv/bin/sphinx-build -W --keep-going docs docs/_build/html`` (tests/test_docs.py builds
it the same way, failing on any warning).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout, not an installed copy

project = "brevitas-a2q"
author = "brevitas-a2q contributors"
copyright = "brevitas-a2q contributors"
release = "0.1.0"

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# MyST: `#section` links in pages resolve to headings up to level 3
myst_heading_anchors = 3

# the docstrings are reST (``code``, :func:`...`, :class:`...`)
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Sphinx 9's new autodoc records type hints of every documented class with inspect.signature, which
# raises DependencyError on a Brevitas injector (see _drop_record_typehints); the class-based autodoc
# lets that recording be switched off
autodoc_use_legacy_class_based = True

html_theme = "alabaster"
html_title = "brevitas-a2q"


def _drop_record_typehints(app, config):
    """autodoc's ``record_typehints`` feeds ``autodoc_typehints = "description"`` only (not used
    here) and calls ``inspect.signature`` on every documented class; on a Brevitas
    ``ExtendedInjector`` quantizer that raises ``DependencyError`` (an injector resolves attribute
    lookups itself), which autodoc reports as an error."""
    from sphinx.ext.autodoc.typehints import record_typehints

    for listener in list(app.events.listeners.get("autodoc-process-signature", [])):
        if listener.handler is record_typehints:
            app.disconnect(listener.id)


def setup(app):
    # after autodoc connected its handlers (config-inited, default priority 500)
    app.connect("config-inited", _drop_record_typehints, priority=900)
