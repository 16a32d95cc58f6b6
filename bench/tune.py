"""Tune search throughput and cluster utilisation, with and without ASHA.

    python bench/tune.py                    # 6 trials x 4 epochs, tiny RAN, synthetic banded faces
    python bench/tune.py --samples 8 --epochs 6 --train 64

The same search (same seed, so the same sampled trials) runs twice on one local Ray: FIFO, where
every trial trains all its epochs, and ASHA (grace 1 epoch, reduction factor 2). The learning rate
is log-uniform over 1e-6..0.1, so some trials cannot learn in the budget: those are ASHA's savings.

    trials/hour   trials ended / wall time of the search
    utilisation   busy CPU-seconds / available CPU-seconds, where busy is each trial's running time
                  x the CPUs it holds (its workers plus the trial function's sliver) and available
                  is the search's wall time x the cluster's CPUs
The table is printed and appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
from _results import report  # noqa: E402
from PIL import ImageDraw  # noqa: E402
from shard_fixtures import draw_face, write_dataset  # noqa: E402

from ranray.ray_runtime import ensure_ray  # noqa: E402
from ranray.tune import (DRIVER_CPU, STOPPED_EARLY, max_concurrent, plan_search,  # noqa: E402
                         run_search)

NUM_CLASSES = 4
BAND_COLORS = [(230, 30, 30), (30, 230, 30), (30, 30, 230), (240, 240, 240)]
SEED = 7  # draws lr 0.031, 1.3e-5, 0.023, 0.013, 2.2e-4, 2.5e-5: three that learn, three that cannot


class BandedFaces:
    """Faces whose class is the colour of a forehead band (learnable in an epoch or two)."""

    def __init__(self, splits: dict[str, int]):
        self.labels = iter([i % NUM_CLASSES for n in splits.values() for i in range(n)])

    def __call__(self, rng: np.random.Generator):
        img, landmarks = draw_face(rng)
        ImageDraw.Draw(img).rectangle([0, 0, 111, 24], fill=BAND_COLORS[next(self.labels)])
        return img, landmarks


def write_configs(root: Path, args: argparse.Namespace, use_asha: bool) -> Path:
    splits = {"train": args.train, "val": args.val}
    data = root / "data"
    if not data.exists():
        write_dataset(data, splits, num_classes=NUM_CLASSES, draw=BandedFaces(splits))
    base = root / "base.yaml"
    base.write_text(yaml.safe_dump({
        "data": {"dir": str(data), "loader": "torch", "num_threads": 0, "augment": {"enabled": False}},
        "model": {"backbone": "iresnet_tiny", "num_classes": NUM_CLASSES, "num_regions": 2},
        "optim": {"lr": 0.05, "milestones": [0.9], "weight_decay": 0.0},
        "checkpoint": {"keep": 1}, "epochs": args.epochs, "batch_size": 8, "precision": "bf16"}))
    tune_cfg = root / f"tune_{'asha' if use_asha else 'fifo'}.yaml"
    tune_cfg.write_text(yaml.safe_dump({
        "name": f"bench_{'asha' if use_asha else 'fifo'}", "storage_path": str(root / "runs"),
        "base_config": str(base), "space": {"lr_min": 1e-6, "lr_max": 0.1},
        "num_samples": args.samples, "use_asha": use_asha, "grace_period": 1, "reduction_factor": 2,
        "max_epochs": args.epochs, "workers_per_trial": 1, "cpus_per_worker": args.cpus_per_worker,
        "seed": SEED, "tracking": {"experiment": "bench-tune"}}))
    return tune_cfg


def measure(config: Path, cluster_cpus: float) -> dict[str, float]:
    from ray import tune

    plan = plan_search(config)
    started = time.perf_counter()
    result = run_search(plan)
    wall = time.perf_counter() - started
    frames = tune.ExperimentAnalysis(str(plan.experiment_dir)).trial_dataframes
    held = plan.cfg.workers_per_trial * plan.cfg.cpus_per_worker + DRIVER_CPU
    busy = sum(float(df["time_total_s"].max()) * held for df in frames.values() if "time_total_s" in df)
    return {
        "wall_s": wall, "trials": len(result.rows), "trials_per_hour": len(result.rows) / wall * 3600,
        "epochs": sum(r.epochs_run for r in result.rows),
        "stopped": sum(r.status == STOPPED_EARLY for r in result.rows),
        "concurrent": max_concurrent(plan.cfg, {"CPU": cluster_cpus}),
        "utilisation": busy / (wall * cluster_cpus),
        "best": result.best.best_metric if result.best else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train", type=int, default=32, help="training images")
    parser.add_argument("--val", type=int, default=16, help="validation images")
    parser.add_argument("--cpus-per-worker", type=float, default=0.95,
                        help="0.95 lets two trials (each with a 0.01-CPU driver) share 2 CPUs")
    args = parser.parse_args()

    import ray

    load_start = os.getloadavg()[0]
    ensure_ray()
    cpus = float(ray.cluster_resources().get("CPU", 0))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="ranray-bench-tune-") as tmp:
        for mode, use_asha in (("FIFO", False), ("ASHA", True)):
            rows[mode] = measure(write_configs(Path(tmp), args, use_asha), cpus)
            print(mode, rows[mode], flush=True)
    fifo, asha = rows["FIFO"], rows["ASHA"]
    saved = fifo["wall_s"] - asha["wall_s"]
    report(
        f"Tune search: {args.samples} trials x {args.epochs} epochs, FIFO vs ASHA",
        ["scheduler", "wall s", "trials", "trials/hour", "epochs trained", "stopped early",
         "concurrent trials", "utilisation", "best val_accuracy"],
        [[mode, r["wall_s"], r["trials"], r["trials_per_hour"], r["epochs"], r["stopped"], r["concurrent"],
          f"{r['utilisation']:.0%}", r["best"]] for mode, r in rows.items()],
        notes=(f"Ray with {cpus:g} CPUs; iresnet_tiny RAN (K=2), {args.train} train / {args.val} val synthetic "
               f"banded faces, batch 8, bf16; lr log-uniform 1e-6..0.1 (seed {SEED}), 1 worker x "
               f"{args.cpus_per_worker} CPU per trial. ASHA saved {saved:.0f} s ({saved / fifo['wall_s']:.0%} of "
               f"the FIFO search) and trained {fifo['epochs'] - asha['epochs']} fewer epochs. Utilisation counts "
               f"CPUs held by running trials; trainer start-up inside a trial counts as busy (on this shared machine "
               f"it dominates a trial: load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at "
               f"the end)."))


if __name__ == "__main__":
    main()
