"""fedlora/provenance.py: the source hash is the same in the launcher's checkout and in the FAB the
ServerApp runs from, the git state is read right (dirty = changed/untracked code only), the
launcher's commit is kept only when it describes the code that ran, and run.json carries it all."""

from __future__ import annotations

import io
import json
import subprocess
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from fedlora import provenance
from fedlora.launch import PROJECT, flower_env


def test_fab_and_checkout_hash_the_same_sources(tmp_path):
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(PROJECT))) as z:
        z.extractall(tmp_path)
    assert provenance.source_sha256(tmp_path / "fedlora") == provenance.source_sha256()
    (tmp_path / "fedlora" / "validate.py").write_text("# changed\n", encoding="utf-8")
    assert provenance.source_sha256(tmp_path / "fedlora") != provenance.source_sha256()
    # no .git in the FAB: without the launcher's word, the hash alone
    assert provenance.code_version({}, tmp_path / "fedlora").keys() == {"source_sha256"}


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


def test_git_state_is_dirty_only_for_code_changes(tmp_path):
    pkg = tmp_path / "fedlora"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "c")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert provenance.git_state(pkg) == {"git_commit": head, "git_dirty": False}
    (tmp_path / "results.json").write_text("{}")          # records are not code
    assert provenance.git_state(pkg)["git_dirty"] is False
    (pkg / "new.py").write_text("")                       # an untracked module is
    assert provenance.git_state(pkg)["git_dirty"] is True
    (pkg / "new.py").unlink()
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert provenance.git_state(pkg)["git_dirty"] is True
    # a package that is not the top of a checkout: no git state
    assert provenance.git_state(tmp_path / "elsewhere" / "fedlora") == {}


def test_launchers_commit_is_kept_only_for_the_same_code():
    own = provenance.source_sha256()
    said = {"git_commit": "abc", "git_dirty": False}
    same = provenance.code_version({provenance.ENV: json.dumps({**said, "source_sha256": own})})
    assert same == {"source_sha256": own, **said, "git_matches_code": True}
    other = provenance.code_version({provenance.ENV: json.dumps({**said, "source_sha256": "0"})})
    assert other["git_matches_code"] is False and other["source_sha256"] == own
    # every Flower process the launcher starts carries it
    env = json.loads(flower_env(Path("/tmp/x"))[provenance.ENV])
    assert env["source_sha256"] == own and len(env.get("git_commit", "")) in (0, 40)


def test_run_json_records_provenance(tmp_path, sample_dir, task_identity):
    """The real ServerApp ``run`` (in this process, nodes = the real ClientApp functions)."""
    from fedlora.config import RunConfig
    from fedlora.server_app import run

    from conftest import InProcessGrid

    rc = {"num-server-rounds": 1, "feature-maps": 8, "lora-rank": 4,
          "max-examples-per-client": 32, "eval-max-examples": 32, "dataset": "npz",
          "partitioner": "iid", "data-dir": sample_dir, "run-dir": str(tmp_path),
          "run-name": "p", "device": "cpu", "payload-table": "names"}
    run(InProcessGrid(rc, node_ids=(1, 2)), RunConfig.from_run_config(rc))
    meta = json.loads((tmp_path / "p" / "run.json").read_text())
    prov = meta["provenance"]
    assert prov["wire"] == meta["wire"] == "fedlora/v2" and prov["payload_format"] == 1
    assert prov["code"]["source_sha256"] == provenance.source_sha256()
    assert set(prov["versions"]) == {"python", "fedlora", "flwr", "torch", "numpy", "peft",
                                     "transformers"}
    assert all(prov["versions"].values()), prov["versions"]
    assert prov["server"]["device"] == "cpu" and prov["server"]["torch_threads"] >= 1
    # the commit at the top level, as the checkout knows it (this test runs in one)
    head = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    assert meta["commit"] == prov["code"].get("git_commit") == (head or None)
    assert meta["commit_dirty"] == prov["code"].get("git_dirty")
