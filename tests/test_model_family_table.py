"""docs/vit.md's model-family table is what scripts/model_family_table.py finds by trying every family now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_docs_table_is_current():
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("model_family_table", ROOT / "scripts" / "model_family_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check", str(ROOT / "docs" / "vit.md")]) == 0, (
        "docs/vit.md is out of date: run python scripts/model_family_table.py --write docs/vit.md")
