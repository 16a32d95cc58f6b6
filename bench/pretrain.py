"""Partial FC on this CPU: step time and peak memory per worker for 10k / 100k / 1M classes.

2 workers (gloo, torch.multiprocessing spawn, 1 thread each), sample rate 1 and 0.1. Each
configuration runs in fresh processes; a worker's peak RSS (polled every ms) minus its RSS before
the head was built is the head's own peak; it is printed beside `memory_estimate` (the formula
docs/SCALING.md is generated from). A step is forward + backward + PartialFCSGD step on random
embeddings (the backbone is left out: this measures the head). A second table gives the saved
activations per image of the iResNet-50 backbone, which sets the backbone reserve in SCALING.md.

    .venv/bin/python bench/pretrain.py [--emb 128] [--batch 64] [--steps 4] [--skip-backbone]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import report  # noqa: E402

from ranray.models.margin import margin_preset  # noqa: E402
from ranray.models.partial_fc import PartialFC, make_optimizer, memory_estimate  # noqa: E402

WORLD = 2
CLASSES = (10_000, 100_000, 1_000_000)
RATES = (1.0, 0.1)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Polls this process's RSS every millisecond in a thread (torch kernels release the GIL).

    getrusage's lifetime peak would include start-up; this one starts when the head is built.
    """

    def __init__(self) -> None:
        self.peak, self._stop = _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_bytes())


def _step(pfc: PartialFC, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer | None = None) -> None:
    opt = opt or make_optimizer(pfc, lr=0.1)
    opt.zero_grad(set_to_none=True)
    pfc(x.requires_grad_(True), y).backward()
    opt.step()


def _worker(rank: int, init: str, out: str, classes: int, rate: float, emb: int, batch: int, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD,
                            timeout=dt.timedelta(seconds=600))
    gen = torch.Generator().manual_seed(rank)
    data = [(torch.randn(batch, emb, generator=gen), torch.randint(0, classes, (batch,), generator=gen))
            for _ in range(steps + 1)]
    _step(PartialFC(WORLD, 4, 1.0), torch.randn(2, 4), torch.tensor([0, 1]))  # pages in kernels and gloo
    before = _rss_bytes()
    peak = PeakRSS()
    pfc = PartialFC(classes, emb, rate, margin_preset("arcface"), seed=0)
    opt = make_optimizer(pfc, lr=0.1, momentum=0.9, weight_decay=5e-4)
    times = []
    for x, y in data:  # the first step warms up (allocator, momentum buffer) and is not timed
        dist.barrier()
        start = time.perf_counter()
        _step(pfc, x, y, opt)
        times.append(time.perf_counter() - start)
    torch.save({"step_s": sum(times[1:]) / steps, "peak": peak.stop() - before}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_config(classes: int, rate: float, emb: int, batch: int, steps: int) -> dict:
    # A fixed mmap threshold makes glibc return every freed large tensor to the OS at once, so
    # RSS follows live tensors (the default threshold grows and keeps freed blocks mapped).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(f"{tmp}/init", tmp, classes, rate, emb, batch, steps), nprocs=WORLD,
                           start_method="spawn")
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(WORLD)]
    return {"step_s": max(r["step_s"] for r in ranks), "peak": max(r["peak"] for r in ranks)}


def backbone_activations(name: str = "iresnet50", batch: int = 2) -> list[list[object]]:
    """Bytes saved for backward per image (what a training step keeps until backward)."""
    from ranray.models import create_model

    model = create_model(name).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rows = []
    for label, autocast in (("fp32", False), ("bf16 autocast", True)):
        seen: dict[int, int] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(torch.randn(batch, 3, 112, 112))
        per_image = sum(v for k, v in seen.items() if k not in params) / batch
        n_params = sum(p.numel() for p in model.parameters())
        rows.append([name, label, f"{per_image / 1e6:.1f}", f"{128 * per_image / 1e9:.1f}",
                     f"{3 * 4 * n_params / 1e9:.2f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--emb", type=int, default=128, help="embedding size (512 in real runs; 128 fits this box)")
    ap.add_argument("--batch", type=int, default=64, help="batch per worker")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    ap.add_argument("--skip-backbone", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for classes in CLASSES:
        for rate in RATES:
            res = run_config(classes, rate, args.emb, args.batch, args.steps)
            est = memory_estimate(classes, args.emb, WORLD, args.batch, rate)
            rows.append([f"{classes:,}", rate, f"{int(rate * classes):,}", f"{res['step_s'] * 1000:.0f}",
                         f"{res['peak'] / 2**20:.0f}", f"{est.total / 2**20:.0f}"])
            print(rows[-1], flush=True)
    report("Partial FC head on CPU (2 gloo workers)",
           ["classes", "sample rate", "r x classes", "step ms", "peak RSS MiB / worker", "estimate MiB / worker"],
           rows,
           notes=(f"Embedding {args.emb}, batch {args.batch} per worker (global {WORLD * args.batch}), 1 thread "
                  f"per worker, forward + backward + PartialFCSGD step, mean of {args.steps} steps after one "
                  "warm-up; the backbone is not included. Peak RSS is measured above each worker's RSS before "
                  "the head was built. The 2-core machine was shared with other jobs while this ran, so times "
                  "are noisy; compare rows, not absolute values."))
    if not args.skip_backbone:
        report("Backbone saved activations (CPU measurement, batch 2)",
               ["backbone", "precision", "MB / image", "GB at 128 / GPU", "params+grad+momentum GB"],
               backbone_activations(),
               notes="Tensors saved for backward during one training forward (saved_tensors_hooks), "
                     "counted once per storage, parameters excluded.")


if __name__ == "__main__":
    main()
