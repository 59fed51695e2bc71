"""Size and cold start of the app images (issue 38): the full image beside the slim node images.

    DOCKER_HOST=unix:///path/docker.sock python benchmarks/images.py \
        [--images fedlora-app:latest fedlora-node:vision] [--data tests/data/fashion-mnist-sample] \
        [--repeat 3] [--out results/footprint]

Needs a running Docker daemon holding the images (docker/build-offline.sh, with
``FEDLORA_VARIANT=node-vision`` for the slim one); ``tests/test_docker.py`` runs the same
measurement on its private daemon. Per image:

* ``size_mb``: ``docker image inspect .Size``;
* ``cold_start_s``: ``docker run --rm --network none`` of a vision node's start, to the end:
  import the ClientApp, load its data (the Fashion-MNIST sample mounted at /data), partition it,
  build the LoRA model (what a SuperNode's ClientApp does before its first round); median of
  ``--repeat`` runs, each a new container (the host's page cache is warm after the first);
* ``import_s``: the same, timed inside the container (Python's part alone);
* ``modules``: which of the text stack / server packages the image holds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "fashion-mnist-sample"
CHECK = ("transformers", "peft", "datasets", "pyarrow", "pandas", "scipy", "sklearn",
         "tensorboard", "dp_accounting", "numba", "torch")
START = """
import time; t = time.perf_counter()
import json, importlib.util as u
from fedlora import client_app
from fedlora.config import RunConfig
from fedlora.tasks import make_task
cfg = RunConfig.from_run_config({"dataset": "npz", "data-dir": "/data", "feature-maps": 16,
                                 "lora-rank": 8, "partitioner": "iid"})
task = make_task(cfg)
x, y = task.client_data(0, 2)
client_app._expected_shapes(task, True)
print(json.dumps({"import_s": time.perf_counter() - t, "examples": len(y),
                  "holds": [m for m in %r if u.find_spec(m)]}))
""" % (CHECK,)


def docker(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def measure(images: list[str], data: Path = SAMPLE, repeat: int = 3, run=docker) -> list[dict]:
    """``run(args)``: a docker client call (returns a CompletedProcess)."""
    rows = []
    for image in images:
        size = int(run(["image", "inspect", "-f", "{{.Size}}", image]).stdout.strip())
        walls, inner = [], []
        for _ in range(repeat):
            t = time.perf_counter()
            res = run(["run", "--rm", "--network", "none", "--entrypoint", "python",
                       "-e", "FEDLORA_PARTITION_CACHE=", "-v", f"{data}:/data:ro",
                       image, "-c", START])
            walls.append(time.perf_counter() - t)
            if res.returncode != 0:
                raise RuntimeError(f"{image}: {res.stderr[-2000:]}")
            inner.append(json.loads(res.stdout.strip().splitlines()[-1]))
        rows.append({"image": image, "size_mb": round(size / 2**20, 1),
                     "cold_start_s": round(statistics.median(walls), 2),
                     "cold_start_runs_s": [round(w, 2) for w in walls],
                     "import_s": round(statistics.median(r["import_s"] for r in inner), 2),
                     "examples": inner[0]["examples"], "holds": inner[0]["holds"]})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| image | size MB | cold start s (median) | of it in Python s | holds |",
           "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| `{r['image']}` | {r['size_mb']:.0f} | {r['cold_start_s']:.2f} | "
                   f"{r['import_s']:.2f} | {', '.join(r['holds'])} |")
    return "\n".join(out) + "\n"


def write(rows: list[dict], out: Path, note: str = "", command: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    command = command or "python benchmarks/images.py " + " ".join(sys.argv[1:])
    doc = {"command": command, "note": note,
           "load_avg": os.getloadavg(), "images": rows}
    (out / "images.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "images.md").write_text("# App images: size and cold start\n\n" + (note + "\n\n" if note else "")
                                   + table(rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", nargs="+", default=["fedlora-app:latest", "fedlora-node:vision"])
    ap.add_argument("--data", default=str(SAMPLE))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "results" / "footprint"))
    args = ap.parse_args(argv)
    rows = measure(args.images, Path(args.data), args.repeat)
    write(rows, Path(args.out))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
