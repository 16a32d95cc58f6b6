"""Tracking overhead per epoch: an `mlflow server` over HTTP against the embedded sqlite store.

What rank 0 of the training engine sends per epoch, through ranray.tracking.Tracker exactly as the
engine calls it: every `log_every_n_steps` steps one asynchronous batch (train_loss, lr,
images_per_s; `wait=False`), at the epoch's end one synchronous batch of the epoch's metrics
(22, as fine-tuning's validation reports them) and the flush the engine does at the run's end.
No model runs: the figures are the time the training thread spends inside tracking calls (the
step loop's own work is not in them), so they add to an epoch's time one for one.

    .venv/bin/python bench/tracking.py [--epochs 5 --steps-per-epoch 500 --log-every 50,1]

The server is started here (own sqlite store, --serve-artifacts, the job runner off), on this
machine: a remote server adds its network round trips to the synchronous call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import report  # noqa: E402
from mlflow_server import MlflowServer  # noqa: E402

from ranray.config import TrackingConfig, TrainConfig, flatten  # noqa: E402
from ranray.hardware import cpu_info  # noqa: E402
from ranray.tracking import Tracker  # noqa: E402

EPOCH_METRICS = 22  # val_accuracy, val_loss, 8 per-class and 3 subset accuracies, best_*, step, epoch, ...


def one_run(uri: str, run_dir: Path, epochs: int, steps: int, every: int) -> tuple[list[float], float, float]:
    """(seconds inside tracking calls per epoch, flush seconds, start seconds) of one run."""
    t0 = time.perf_counter()
    tracker = Tracker(TrackingConfig(uri=uri, experiment="bench-tracking"), run_dir)
    tracker.start(run_dir.name, params=flatten(TrainConfig()), tags={"job": "bench"})
    started = time.perf_counter() - t0
    per_epoch = []
    step = 0
    for epoch in range(epochs):
        spent = 0.0
        for _ in range(steps):
            step += 1
            if step % every == 0:
                t = time.perf_counter()
                tracker.log_metrics({"train_loss": 1.0 / step, "lr": 0.1, "images_per_s": 100.0}, step=step,
                                    wait=False)
                spent += time.perf_counter() - t
        t = time.perf_counter()
        tracker.log_metrics({f"val_metric_{i}": i / EPOCH_METRICS for i in range(EPOCH_METRICS)} | {"epoch": epoch},
                            step=step)
        spent += time.perf_counter() - t
        per_epoch.append(spent)
    t = time.perf_counter()
    tracker.flush()
    flushed = time.perf_counter() - t
    tracker.end()
    if tracker.offline:
        raise RuntimeError(f"the tracker went offline against {uri}: the figures would be wrong")
    return per_epoch, flushed, started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--steps-per-epoch", type=int, default=500)
    p.add_argument("--log-every", default="50,1", help="log_every_n_steps values (the default is 50)")
    args = p.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ranray-bench-tracking-") as tmp:
        root = Path(tmp)
        server = MlflowServer.start(root / "server")
        try:
            stores = {"sqlite (embedded)": lambda d: "", "mlflow server, HTTP": lambda d: server.url}
            for every in (int(v) for v in args.log_every.split(",")):
                for name, uri_for in stores.items():
                    run_dir = root / f"{name.split()[0]}-{every}"
                    per_epoch, flushed, started = one_run(uri_for(run_dir), run_dir, args.epochs,
                                                          args.steps_per_epoch, every)
                    calls = args.steps_per_epoch // every
                    rows.append((name, every, calls, 1000 * statistics.median(per_epoch),
                                 1000 * max(per_epoch), 1000 * flushed, 1000 * started))
        finally:
            server.kill()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    report("Tracking overhead per epoch: HTTP server vs sqlite (bench/tracking.py)",
           ["store", "log every", "async batches / epoch", "ms / epoch (median)", "ms / epoch (max)",
            "flush ms", "start ms"], rows,
           notes=f"{args.epochs} epochs of {args.steps_per_epoch} steps, the engine's calls without a model "
                 f"(time inside Tracker calls on the training thread; the epoch-end batch of {EPOCH_METRICS} "
                 f"metrics is synchronous). Server on this machine, sqlite backend. Load average after the "
                 f"run {load}. {cpu_info().describe()}.")


if __name__ == "__main__":
    main()
