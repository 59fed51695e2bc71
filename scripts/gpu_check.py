"""GPU check of the paper-scale vision setting, in one process (no SuperLink, no Ray).

    python scripts/gpu_check.py --data-dir DIR [--rounds 10] [--clients 16] [--per-round 8]

What it runs, with fedlora's own task, method and codec code (the parts a ClientApp runs):
1. ``device=auto`` resolves to CUDA and the task puts its model there.
2. Parity: one client round of ``flocora``, ``flasc`` (topk:0.25 upload, ``flasc-freeze=client`` masks) and
   ``lora-a2`` (rank masks, alternating freeze) on the GPU and on the CPU from the same global
   adapter and seed; prints the relative difference of the uploads (the GPU uses cuDNN/TF32, so
   close, not bit-identical) and fails if an upload is not finite or differs by more than 10%.
3. A FLoCoRA federation at the paper's width (ResNet-8, 64 maps, r=32, 5 local epochs, batch 32,
   500 examples per client, SGD lr 0.01) with ``affine:4`` uploads encoded and decoded by the
   real codec, weighted mean on the "server", evaluation on the GPU after every round; prints
   accuracy, measured upload bytes and seconds per round. Clients are Dirichlet(0.5) splits made
   here with numpy (flwr-datasets is not needed), so this is a scale and device check, not a
   reproduction of the paper's table (use ``benchmarks/run.py paper-flocora`` for that).

``DIR`` holds ``train.npz``/``test.npz`` (x uint8 NHWC, y int), e.g. ``../shared/data/cifar10``
or a subset of it. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import OrderedDict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fedlora.adapters import load_state, state_to_numpy, travelling_state  # noqa: E402
from fedlora.compression import decode_payload, parse_spec  # noqa: E402
from fedlora.config import RunConfig  # noqa: E402
from fedlora.methods import flasc, flocora, lora_a2  # noqa: E402
from fedlora.strategies.base import ClientRound, ClientUpdate, weighted_mean  # noqa: E402
from fedlora.strategies.protocol import TrainInstruction  # noqa: E402
from fedlora.tasks import make_task  # noqa: E402
from fedlora.tasks.data import load_images  # noqa: E402
from fedlora.tasks.vision import to_tensor  # noqa: E402


def dirichlet_split(y: np.ndarray, clients: int, alpha: float, seed: int, per_client: int):
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    parts = [[] for _ in range(clients)]
    for idx in by_class:
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(idx)).astype(int)[:-1]
        for p, chunk in zip(parts, np.split(idx, cuts)):
            p.extend(chunk.tolist())
    return [np.sort(np.asarray(p[:per_client], dtype=np.int64)) for p in parts]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-round", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--feature-maps", type=int, default=64)
    ap.add_argument("--eval-examples", type=int, default=2000)
    ap.add_argument("--budget-s", type=float, default=300, help="stop the federation after this")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: run every step on the CPU (a smoke test of this script)")
    a = ap.parse_args(argv)
    failed = []
    print(f"torch {torch.__version__}; cuda available: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    base = {"dataset": "cifar10", "data-dir": a.data_dir, "model": "resnet8",
            "feature-maps": a.feature_maps, "lora-rank": 32, "local-epochs": a.epochs,
            "max-examples-per-client": 0, "eval-max-examples": a.eval_examples,
            "method": "flocora", "device": "auto"}
    cfg = RunConfig.from_run_config(base)
    task = make_task(cfg)
    print(f"device=auto -> {task.device}")
    if task.device.type != "cuda" and not a.cpu_smoke:
        failed.append("device=auto did not pick CUDA")
    gpu = "cpu" if a.cpu_smoke else "cuda"

    train = load_images("cifar10", a.data_dir, "train")
    mean, std = task._norm_stats()
    parts = dirichlet_split(train.y, a.clients, 0.5, 0, a.per_client)
    data = [(to_tensor(train.x[p], mean, std), torch.from_numpy(train.y[p])) for p in parts]
    print(f"{a.clients} clients, examples per client: {[len(p) for p in parts]}")

    def client_round(t, method, received, pid, config, epochs=None):
        c = t.cfg
        t.client_data = lambda *_args, **_kw: data[pid]
        if epochs is not None:
            t.cfg = c.replace(local_epochs=epochs)
        try:
            cr = ClientRound(cfg=t.cfg, task=t, ins=TrainInstruction.from_config(
                                 {"method": "", "codec-up": "fp32", **config}), received=received,
                             partition_id=pid, num_partitions=a.clients)
            return method.client_train(cr)
        finally:
            t.cfg = c

    # ---- 2. parity GPU vs CPU, one short client round per method ------------------------
    small = RunConfig.from_run_config({**base, "feature-maps": 16, "lora-rank": 8})
    checks = {"flocora": (flocora, {}, {"codec-up": "fp32"}),
              "flasc": (flasc, {"method": "flasc", "flasc-freeze": "client"},
                        {"codec-up": "topk:0.25", "flasc-freeze": "client"}),
              "lora-a2": (lora_a2, {"method": "lora-a2", "rank-budget": 2}, {"codec-up": "fp32"})}
    for name, (method, over, conf) in checks.items():
        outs = {}
        for label, dev in (("gpu", gpu), ("cpu", "cpu")):
            c = small.replace(**{k.replace("-", "_"): v for k, v in over.items()}, device=dev)
            t = make_task(c)
            glob = state_to_numpy(travelling_state(t.new_model(adapter=True)))
            if name == "flasc":  # a sparse global, so the frozen-zero masks matter
                glob = OrderedDict((k, np.where(np.abs(v) > np.median(np.abs(v)), v, 0)
                                    .astype(np.float32)) for k, v in glob.items())
            t0 = time.perf_counter()
            res = client_round(t, method, glob, 0, {"server-round": 1, **conf}, epochs=1)
            outs[label] = (res.upload, time.perf_counter() - t0)
        num = sum(float(np.abs(outs["gpu"][0][k] - outs["cpu"][0][k]).sum()) for k in outs["cpu"][0])
        den = sum(float(np.abs(v).sum()) for v in outs["cpu"][0].values()) or 1.0
        finite = all(np.isfinite(v).all() for v in outs["gpu"][0].values())
        rel = num / den
        ok = finite and rel < 0.1
        print(f"parity {name:8s}: relative L1 difference GPU vs CPU {rel:.2e}; "
              f"{outs['gpu'][1]:.2f} s on {gpu}, {outs['cpu'][1]:.2f} s on CPU  "
              f"{'ok' if ok else 'FAIL'}")
        if not ok:
            failed.append(f"parity {name}")

    # ---- 3. FLoCoRA federation at paper width -------------------------------------------
    pipe = parse_spec("affine:4")
    model = task.new_model(adapter=True)
    state = state_to_numpy(travelling_state(model))
    test = task.test_data()
    rng = np.random.default_rng(0)
    t_start = time.perf_counter()
    print(f"federation: {a.rounds} rounds, {a.per_round}/{a.clients} clients per round, "
          f"{a.epochs} local epochs, width {a.feature_maps}, r=32, upload affine:4")
    for rnd in range(1, a.rounds + 1):
        t0 = time.perf_counter()
        ups, up_bytes = [], 0
        for pid in sorted(rng.choice(a.clients, a.per_round, replace=False).tolist()):
            res = client_round(task, flocora, OrderedDict(state), pid,
                               {"server-round": rnd, "codec-up": "affine:4"})
            payload = pipe.encode(res.upload)
            up_bytes += len(payload)
            res.upload = OrderedDict(decode_payload(payload))
            ups.append(ClientUpdate(pid, res.upload, res.num_examples, res.metrics))
        state = weighted_mean(ups)
        t_train = time.perf_counter() - t0
        load_state(model, state)
        m = task.evaluate(model, test)
        if not np.isfinite(m["loss"]):
            failed.append(f"round {rnd}: non-finite loss")
        print(f"round {rnd:3d}: acc {m['accuracy']:.4f} loss {m['loss']:.3f}  "
              f"upload {up_bytes / 1e6:.3f} MB  train {t_train:.1f} s  "
              f"round {time.perf_counter() - t0:.1f} s", flush=True)
        if time.perf_counter() - t_start > a.budget_s:
            print(f"stopping after round {rnd}: time budget {a.budget_s:.0f} s reached")
            break
    print("RESULT:", "FAIL " + ", ".join(failed) if failed else "ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
