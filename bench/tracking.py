"""Tracking overhead per epoch: an `mlflow server` over HTTP against the embedded sqlite store, for one
writer, and for several writers at once against the team's authenticated server (issue 28).

What rank 0 of the training engine sends per epoch, through ranray.tracking.Tracker exactly as the
engine calls it: every `log_every_n_steps` steps one asynchronous batch (train_loss, lr,
images_per_s; `wait=False`), at the epoch's end one synchronous batch of the epoch's metrics
(22, as fine-tuning's validation reports them) and the flush the engine does at the run's end.
No model runs: the figures are the time the training thread spends inside tracking calls (the
step loop's own work is not in them), so they add to an epoch's time one for one.

    .venv/bin/python bench/tracking.py [--epochs 5 --steps-per-epoch 500 --log-every 50,1]
                                       [--writers 4 --concurrent-log-every 50 --step-ms 10]
                                       [--only single|concurrent]

Table 1 (single): one writer; the embedded sqlite store against a plain `mlflow server` (own sqlite
store, --serve-artifacts, the job runner off). Table 2 (concurrent): N writer processes started
together (a barrier), as the trials of a search and a fine-tune on a cluster, each its own run:
every writer its own sqlite store on local disk (what a laptop run does), against one server for
all of them, plain and as the cluster runs it (`ranray track server`, MLflow's basic auth, the
writers logging as one user from a credentials file). The servers run on this machine: a remote
one adds its network round trips to the synchronous calls.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import report  # noqa: E402
from auth_server import AuthServer  # noqa: E402
from mlflow_server import MlflowServer  # noqa: E402

from ranray.config import TrackingConfig, TrainConfig, flatten  # noqa: E402
from ranray.hardware import cpu_info  # noqa: E402
from ranray.run_dir import RunDir  # noqa: E402
from ranray.tracking import Tracker  # noqa: E402

EPOCH_METRICS = 22  # val_accuracy, val_loss, 8 per-class and 3 subset accuracies, best_*, step, epoch, ...


@dataclass
class RunFigures:
    per_epoch: list[float]  # seconds inside tracking calls, per epoch
    flushed: float  # seconds of the flush at the run's end
    started: float  # seconds to open the run (store, experiment, params)
    kept_locally: int  # records the tracker journaled because the store failed them (ranray.run_dir)
    wall: float = 0.0  # the whole run, start to end


def one_run(uri: str, run_dir: Path, epochs: int, steps: int, every: int, credentials: str = "",
            step_s: float = 0.0) -> RunFigures:
    """One run as rank 0 logs it; `step_s`: a step's compute, slept (not counted) between steps."""
    t0 = time.perf_counter()
    tracker = Tracker(TrackingConfig(uri=uri, experiment="bench-tracking", credentials_file=credentials), run_dir)
    tracker.start(run_dir.name, params=flatten(TrainConfig()), tags={"job": "bench"})
    started = time.perf_counter() - t0
    per_epoch = []
    step = 0
    for epoch in range(epochs):
        spent = 0.0
        for _ in range(steps):
            step += 1
            if step_s:
                time.sleep(step_s)
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
    rd = RunDir(run_dir)
    kept = sum(len(f.read_text().splitlines()) for f in (rd.offline_metrics, rd.synced_metrics) if f.is_file())
    return RunFigures(per_epoch, flushed, started, kept, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Several writers at once
# ---------------------------------------------------------------------------------------------


def _writer(job: tuple) -> RunFigures:
    """One writer process: waits for the others, then one run."""
    uri, credentials, run_dir, epochs, steps, every, step_s, barrier = job
    barrier.wait()
    return one_run(uri, Path(run_dir), epochs, steps, every, credentials, step_s)


def concurrent_runs(uri: str, credentials: str, root: Path, writers: int, epochs: int, steps: int,
                    every: int, step_s: float) -> list[RunFigures]:
    """`writers` processes (spawned: no MLflow client state shared), one run each, released together."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(writers) as pool:
        barrier = manager.Barrier(writers)
        jobs = [(uri, credentials, str(root / f"w{i}"), epochs, steps, every, step_s, barrier)
                for i in range(writers)]
        return pool.map(_writer, jobs)


def concurrent_table(args: argparse.Namespace, root: Path, plain: MlflowServer, auth: AuthServer,
                     credentials: str) -> list[tuple]:
    stores = {"sqlite per run (local disk)": ("", ""), "mlflow server, no auth": (plain.url, ""),
              "ranray track server (basic auth)": (auth.url, credentials)}
    rows = []
    for every in (int(v) for v in args.concurrent_log_every.split(",")):
        for writers in (1, args.writers):
            for name, (uri, creds) in stores.items():
                out = root / f"concurrent-{every}-{writers}-{name.split()[0]}"
                runs = concurrent_runs(uri, creds, out, writers, args.epochs, args.steps_per_epoch, every,
                                       args.step_ms / 1000)
                epochs = [e for r in runs for e in r.per_epoch]
                rows.append((name, writers, every, args.steps_per_epoch // every, 1000 * statistics.median(epochs),
                             1000 * max(epochs), 1000 * max(r.flushed for r in runs),
                             1000 * statistics.median(r.started for r in runs), max(r.wall for r in runs),
                             sum(r.kept_locally for r in runs)))
                print(rows[-1], flush=True)
    return rows


def single_table(args: argparse.Namespace, root: Path, server: MlflowServer) -> list[tuple]:
    rows = []
    stores = {"sqlite (embedded)": lambda d: "", "mlflow server, HTTP": lambda d: server.url}
    for every in (int(v) for v in args.log_every.split(",")):
        for name, uri_for in stores.items():
            run_dir = root / f"{name.split()[0]}-{every}"
            run = one_run(uri_for(run_dir), run_dir, args.epochs, args.steps_per_epoch, every)
            if run.kept_locally:
                raise RuntimeError(f"the tracker kept {run.kept_locally} records locally: the figures would be wrong")
            calls = args.steps_per_epoch // every
            rows.append((name, every, calls, 1000 * statistics.median(run.per_epoch),
                         1000 * max(run.per_epoch), 1000 * run.flushed, 1000 * run.started))
    return rows


def load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--steps-per-epoch", type=int, default=500)
    p.add_argument("--log-every", default="50,1", help="log_every_n_steps values (the default is 50)")
    p.add_argument("--writers", type=int, default=4, help="concurrent writers of the second table")
    # Every step against the authenticated server takes minutes per epoch (bench/RESULTS.md): asked for only.
    p.add_argument("--concurrent-log-every", default="50", help="log_every_n_steps values of the second table")
    p.add_argument("--step-ms", type=float, default=10.0,
                   help="second table: a step's compute, slept between steps, so that each writer's batches are "
                        "spread over the epoch as in training (the first table sends them back to back)")
    p.add_argument("--only", choices=("single", "concurrent"), default=None, help="one of the two tables")
    args = p.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="ranray-bench-tracking-") as tmp:
        root = Path(tmp)
        server = MlflowServer.start(root / "server")
        auth = None
        try:
            if args.only != "concurrent":
                rows = single_table(args, root, server)
                report("Tracking overhead per epoch: HTTP server vs sqlite (bench/tracking.py)",
                       ["store", "log every", "async batches / epoch", "ms / epoch (median)", "ms / epoch (max)",
                        "flush ms", "start ms"], rows,
                       notes=f"{args.epochs} epochs of {args.steps_per_epoch} steps, the engine's calls without a "
                             f"model (time inside Tracker calls on the training thread; the epoch-end batch of "
                             f"{EPOCH_METRICS} metrics is synchronous). Server on this machine, sqlite backend. "
                             f"Load average after the run {load()}. {cpu_info().describe()}.")
            if args.only != "single":
                auth = AuthServer.start(root / "auth")
                credentials = str(auth.add_user("alice"))
                rows = concurrent_table(args, root, server, auth, credentials)
                report(f"Tracking overhead per epoch, {args.writers} concurrent writers: the authenticated "
                       "server vs per-run sqlite (bench/tracking.py)",
                       ["store", "writers", "log every", "async batches / epoch / writer", "ms / epoch (median)",
                        "ms / epoch (max)", "flush ms (max)", "start ms (median)", "wall s (max)",
                        "records kept locally"], rows,
                       notes=f"{args.epochs} epochs of {args.steps_per_epoch} steps per writer, the engine's calls "
                             f"without a model, a step's compute slept ({args.step_ms:g} ms, not counted); each "
                             "writer a spawned process with its own run, released together by a barrier; ms / "
                             "epoch: time inside Tracker calls on the writer's training thread, median and max over "
                             "writers x epochs; wall s: a writer's whole run (start, epochs, flush, end); records "
                             "kept locally: what the writers' trackers journaled because the store failed a call "
                             "(pushed again at the run's end; 0 = every call reached the store). Servers on this "
                             "machine (one uvicorn worker each, sqlite backend); the authenticated one is `ranray "
                             "track server` from cluster/mlflow_server.yaml as tests/auth_server.py starts it, every "
                             f"writer logging as alice. Load average after the runs {load()}. CPU flags: "
                             f"{cpu_info().describe()}.")
        finally:
            server.kill()
            if auth is not None:
                auth.stop()


if __name__ == "__main__":
    main()
