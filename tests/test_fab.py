"""The FAB that `flwr run` ships is the app's code, not the repository.

Flower 1.41 packs every *.py/*.md/*.json/*.jsonl of the project by default, and caps a FAB at
10 MiB. Committed benchmark records (rounds.jsonl, summary.json) grew that FAB to 10.38 MB and a
dp-text run failed with "FAB size exceeds maximum allowed size". `fab-include` in pyproject.toml
narrows it; this builds the FAB with Flower's own builder and checks what is inside.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import FAB_MAX_SIZE

ROOT = Path(__file__).resolve().parent.parent


def _fab_names() -> tuple[int, set[str]]:
    fab = build_fab_from_disk(ROOT)
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        return len(fab), {i.filename for i in z.infolist()}


def test_fab_holds_exactly_the_package_sources() -> None:
    size, names = _fab_names()
    package = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "fedlora").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    shipped = {n for n in names if not n.startswith(".info/") and n != "pyproject.toml"}
    # every module the ServerApp/ClientApp may import is there, and nothing else is
    assert shipped == package
    assert "pyproject.toml" in names
    assert not any(n.startswith(("results/", "benchmarks/", "tests/", "docs/")) for n in names)
    # far from Flower's cap, so results can keep growing without breaking runs
    assert size < FAB_MAX_SIZE // 5, size
