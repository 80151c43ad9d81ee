"""Generated documentation stays current: docs/architectures.md lists every row of ARCHS."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import flax_resnet

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("render_architectures", ROOT / "tools" / "render_architectures.py")
render_architectures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_architectures)


def test_architecture_table_is_generated_from_archs():
    page = render_architectures.PAGE.read_text(encoding="utf-8")
    assert render_architectures.current(page) == render_architectures.render(), (
        "docs/architectures.md is out of date: run `python tools/render_architectures.py`"
    )


def test_architecture_table_names_every_row_with_its_published_count():
    table = render_architectures.render()
    for name, spec in flax_resnet.ARCHS.items():
        line = next(l for l in table.splitlines() if l.startswith(f"| `{name}` "))
        assert f"{flax_resnet.PARAM_COUNTS[name]:,}" in line
        assert spec.source in line
