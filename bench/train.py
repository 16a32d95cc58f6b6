"""Training throughput of the real fine-tuning loop: images/s per worker, 1 vs 2 workers,
small and r50 backbones, fp32 vs bf16, NCHW vs channels_last, the loss read every step vs every N.

Each cell is one TorchTrainer run of ranray.train.finetune on a synthetic prepared split
(tests/shard_fixtures.py faces), stopped after --steps steps (max_steps). The epoch's
report gives the group's images/s over all its steps (data loading included, the first step's
warm-up too: measure enough steps); the table shows it per worker, for the group, and as steps/s.
`--runtimes ray,local` runs each cell through Ray Train's workers and through the local runtime (this
process, `ranray train --local`; one worker only): the steps/s and the cell's wall time show what Ray
adds per step and per run. `--log-every 1,50` compares reading the loss (a device sync) and logging it to MLflow after every
step with the default cadence. The load average is printed with the table: on a shared machine the
figures are lower bounds.

    .venv/bin/python bench/train.py                                 # CPU: tiny + r50, fp32/bf16, 1/2 workers
    .venv/bin/python bench/train.py --backbones iresnet_tiny --formats false,true --workers 2
    .venv/bin/python bench/train.py --backbones iresnet18 --workers 2 --steps 5
    .venv/bin/python bench/train.py --backbones iresnet_tiny --precisions fp32 --workers 2 --steps 100 --log-every 1,50
    .venv/bin/python bench/train.py --backbones iresnet_tiny --precisions bf16 --workers 1 --runtimes ray,local --steps 40
    .venv/bin/python bench/train.py --gpu --backbones iresnet50 --precisions bf16 --batch 128 --images 8192
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import report  # noqa: E402
from shard_fixtures import write_dataset  # noqa: E402

from ranray.config import ConfigError, TrainConfig, load_config  # noqa: E402
from ranray.hardware import cpu_info  # noqa: E402
from ranray.train.launch import run_training  # noqa: E402


def cell_config(args: argparse.Namespace, data: Path, storage: Path, backbone: str, precision: str,
                workers: int, channels_last: str, log_every: int, runtime: str) -> TrainConfig:
    gpu = ["scaling.use_gpu=true", "scaling.gpus_per_worker=1", "data.loader=dali", "data.num_threads=4"]
    cpu = [f"data.loader={args.loader}", "data.num_threads=0" if args.loader == "torch" else "data.num_threads=1"]
    return load_config(TrainConfig, None, [
        f"data.dir={data}", f"run.storage_path={storage}",
        f"run.name={backbone}-{precision}-{workers}w-nhwc-{channels_last}-log{log_every}-{runtime}",
        f"data.channels_last={channels_last}", f"log_every_n_steps={log_every}",
        f"model.backbone={backbone}", f"model.num_regions={args.regions}", f"precision={precision}",
        f"batch_size={args.batch}", f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={args.cpus}",
        "epochs=1", "checkpoint.every_n_steps=0", f"max_steps={args.steps}",
        "optim.name=sgd", "optim.lr=0.01", *(gpu if args.gpu else cpu)])


def measure(cfg: TrainConfig, runtime: str) -> tuple[float, float]:
    """(images/s per worker, images/s of the group) over the run's steps, from its last report."""
    group = run_training(cfg, runtime=runtime).metrics["images_per_s"]
    return group / cfg.scaling.num_workers, group


def run_cell(args, data: Path, storage: Path, backbone: str, precision: str, workers: int, fmt: str,
             log_every: int, runtime: str) -> tuple:
    started = time.perf_counter()
    head = (runtime, backbone, precision, fmt, workers, args.batch, log_every)
    try:
        cfg = cell_config(args, data, storage, backbone, precision, workers, fmt, log_every, runtime)
        per_worker, group = measure(cfg, runtime)
    except ConfigError as err:  # channels_last=true with fp32 on oneDNN's AVX-512 path; --local with 2 workers
        return (*head, f"refused: {str(err)[:60]}...", "-", "-", 0)
    steps_per_s = group / (workers * args.batch)
    return (*head, per_worker, group, round(steps_per_s, 2), round(time.perf_counter() - started))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="iresnet_tiny,iresnet50")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare")
    ap.add_argument("--batch", type=int, default=8, help="faces per worker and step")
    ap.add_argument("--regions", type=int, default=6, help="K, the whole face included")
    ap.add_argument("--steps", type=int, default=4, help="steps per cell (max_steps)")
    ap.add_argument("--images", type=int, default=0, help="training images (default: just enough)")
    ap.add_argument("--cpus", type=float, default=1.0, help="CPUs (torch threads) per worker")
    ap.add_argument("--loader", choices=("torch", "dali"), default="torch", help="CPU runs: loader backend")
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker, DALI mixed decoding")
    ap.add_argument("--formats", default="false", help="data.channels_last values to compare: auto,true,false")
    ap.add_argument("--log-every", default="50", help="log_every_n_steps values to compare, e.g. 1,50")
    ap.add_argument("--runtimes", default="ray", help="ray, local (this process, one worker) or both: ray,local")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(args.cpus))  # the local runtime trains in this process: the threads a worker gets

    import ray

    workers = [int(w) for w in args.workers.split(",")]
    per_epoch = max(workers) * args.batch * (args.steps + 1)
    images = max(args.images, per_epoch)
    ray.init(include_dashboard=True, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(int(args.cpus))}})
    rows = []
    with tempfile.TemporaryDirectory(prefix="ranray-bench-train-") as tmp:
        data = write_dataset(Path(tmp) / "data", {"train": images, "val": max(workers) * args.batch},
                             rows_per_shard=512, row_group_size=64)
        for backbone in args.backbones.split(","):
            for precision in args.precisions.split(","):
                for fmt in args.formats.split(","):
                    for n in workers:
                        for log_every in (int(v) for v in args.log_every.split(",")):
                            for runtime in args.runtimes.split(","):
                                rows.append(run_cell(args, data, Path(tmp) / "runs", backbone, precision, n, fmt,
                                                     log_every, runtime))
                                print(rows[-1], flush=True)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    report("Fine-tuning throughput (bench/train.py)",
           ["runtime", "backbone", "precision", "channels_last", "workers", "batch/worker", "log every", "images/s per worker",
            "images/s total", "steps/s", "cell s"],
           rows,
           notes=f"RAN K={args.regions}, {'GPU, DALI mixed decoding' if args.gpu else f'CPU, {args.loader} loader'}, "
                 f"{args.cpus:g} CPU per worker, mean over {args.steps} steps (the first's warm-up included); "
                 f"load average during the run {load}. {cpu_info().describe()}.")


if __name__ == "__main__":
    main()
