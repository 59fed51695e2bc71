"""The FAB that `flwr run` ships is the app's code, not the repository.

Flower 1.41 packs every *.py/*.md/*.json/*.jsonl of the project by default, and caps a FAB at
10 MiB. Committed benchmark records (rounds.jsonl, summary.json) grew that FAB to 10.38 MB and a
dp-text run failed with "FAB size exceeds maximum allowed size". `fab-include` in pyproject.toml
narrows it; this builds the FAB with Flower's own builder and checks what is inside.
"""

from __future__ import annotations

import io
import zipfile

from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import FAB_MAX_SIZE

from fedlora.launch import PROJECT  # the directory `flwr_run` builds the FAB from


def test_fab_holds_exactly_the_package_sources() -> None:
    fab = build_fab_from_disk(PROJECT)
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        names = {i.filename for i in z.infolist()}
    package = {
        p.relative_to(PROJECT).as_posix()
        for p in (PROJECT / "fedlora").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    shipped = {n for n in names if not n.startswith(".info/") and n != "pyproject.toml"}
    # every module the ServerApp/ClientApp may import is there, and nothing else is
    assert shipped == package
    assert "pyproject.toml" in names
    assert not any(n.startswith(("results/", "benchmarks/", "tests/", "docs/")) for n in names)
    # far from Flower's cap, so results can keep growing without breaking runs
    assert len(fab) < FAB_MAX_SIZE // 5, len(fab)
