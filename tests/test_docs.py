"""The README stays short, docs/configuration.md is the config's own help, links stay inside the
repository and resolve."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from fedlora import configdoc
from fedlora.config import RunConfig
from fedlora.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_at_most_200_lines():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines; move detail to docs/"


def test_configuration_page_is_generated_from_the_current_help():
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text() == configdoc.render(), \
        "docs/configuration.md is stale: run python -m fedlora.configdoc"
    assert configdoc.main(["--check", "--out", str(page)]) == 0


def test_check_fails_on_a_stale_page(tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text(configdoc.render().replace("Federated rounds.", "Rounds."))
    assert configdoc.main(["--check", "--out", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err
    assert configdoc.main(["--out", str(stale)]) == 0 and stale.read_text() == configdoc.render()


def test_every_field_has_short_help_and_one_section():
    for f in dataclasses.fields(RunConfig):
        text = f.metadata.get("help", "")
        assert text.strip(), f"{f.name} has no help"
        assert len(text) <= 260, f"{f.name}: help is {len(text)} characters (one or two lines)"
    listed = [f.name for _, fields in configdoc.sections() for f in fields]
    assert listed == [f.name for f in dataclasses.fields(RunConfig)]
    page = configdoc.render()
    for key in RunConfig.keys():
        assert f"| `{key}` | `" in page, key


def test_method_help_names_every_registered_method():
    text = RunConfig.__dataclass_fields__["method"].metadata["help"]
    missing = [m for m in METHODS if f"`{m}`" not in text]
    assert not missing, f"method help lacks {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_relative_links_resolve_inside_the_repository():
    bad = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if ROOT not in dest.parents and dest != ROOT:
                bad.append(f"{page.name}: {target} leaves the repository")
            elif not dest.exists():
                bad.append(f"{page.name}: {target} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{page.name}: no heading for #{anchor} in {dest.name}")
    assert not bad, "\n".join(bad)


def test_results_blocks_name_a_suite_and_close():
    """``python benchmarks/report.py <suite> --docs`` rewrites these blocks."""
    from benchmarks.suites import SUITES

    found = []
    for page in PAGES:
        text = page.read_text()
        for suite in re.findall(r"<!-- results:([\w-]+) -->", text):
            assert suite in SUITES, f"{page.name}: unknown suite {suite}"
            assert f"<!-- /results:{suite} -->" in text, f"{page.name}: {suite} not closed"
            found.append(suite)
    assert sorted(found) == ["dp-text", "dp-vision", "text-conv", "vision-conv"]
