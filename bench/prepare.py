"""Aligned faces per second: a plain single-process loop vs Ray Data with 1 actor and with all CPUs.

The same synthetic FERPlus faces (48x48, detector "given": dlib's 68-point fit, one re-fit,
similarity warp to 112x112, JPEG) go through
  plain     AlignBatch.process in a loop in this process (the work of one actor, no Ray at all)
  ray x1    prepare's align_rows with an actor pool of 1
  ray xN    the same with one actor per CPU
End to end counts actor start-up and dlib loading; steady state starts when the first batch comes
back (the actors are then up), which is what a long real job sees. Scaling = rate(xN) / rate(x1) / N.

    .venv/bin/python bench/prepare.py [--n 5000]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import report  # noqa: E402

from ranray.data.prepare import AlignBatch, align_options, align_rows  # noqa: E402
from ranray.data.sources import READERS  # noqa: E402
from ranray.data.sources.common import rows_to_table  # noqa: E402
from ranray.data.synth import SynthOptions, synthesize  # noqa: E402


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds_by_process() -> dict[tuple[str, str], tuple[str, float]]:
    """(pid, start time) -> (group, CPU seconds so far) for every live process."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        group = ("driver" if int(pid) == os.getpid() else "align" if "MapWorker" in cmd
                 else "ray" if "ray" in cmd else "other")
        out[(pid, fields[19])] = (group, (int(fields[11]) + int(fields[12])) / TICKS)
    return out


def cpu_used(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds by group between two snapshots: where did the CPUs go during a run."""
    groups = dict.fromkeys(["align", "driver", "ray", "other"], 0.0)
    for proc, (group, seconds) in after.items():
        groups[group] += seconds - before.get(proc, (group, 0.0))[1]
    return groups


@dataclasses.dataclass
class Run:
    name: str
    workers: int
    faces: int
    total_s: float
    steady_faces: int
    steady_s: float
    cpu: dict[str, float] = dataclasses.field(default_factory=dict)  # CPU seconds by group during the run

    @property
    def rate(self) -> float:
        return self.faces / self.total_s

    @property
    def steady_rate(self) -> float:
        return self.steady_faces / self.steady_s if self.steady_s > 0 else float("nan")


def plain_loop(rows, cfg) -> Run:
    worker = AlignBatch(align_options(cfg), cfg.source, cfg.jpeg_quality)  # loading not timed
    dicts = rows_to_table(rows).to_pylist()
    start = time.perf_counter()
    written = sum(1 for d in dicts if not worker.process(d)["reason"])
    seconds = time.perf_counter() - start
    return Run("plain loop (1 process, no Ray)", 1, written, seconds, written, seconds)


def ray_data(rows, cfg, workers: int) -> Run:
    cfg = dataclasses.replace(cfg, num_workers=workers)
    cpu_before = cpu_seconds_by_process()
    start = time.perf_counter()
    first_at, first_rows, faces = None, 0, 0
    for table in align_rows(rows, cfg):
        faces += table.num_rows
        cpu_after = cpu_seconds_by_process()  # now, while the actors are alive: they go with the dataset
        if first_at is None:
            first_at, first_rows = time.perf_counter(), table.num_rows
    end = time.perf_counter()
    cpu = cpu_used(cpu_before, cpu_after)
    return Run(f"Ray Data, {workers} actor(s)", workers, faces, end - start, faces - first_rows, end - first_at, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="synthetic faces (default 5000: enough that actor start-up does not dominate)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        raw = synthesize(Path(tmp) / "raw", SynthOptions(n=args.n, seed=args.seed, non_face_frac=0.0))
        cfg = raw.prepare_config(Path(tmp) / "out")
        rows = [r for r in READERS[cfg.source](cfg).rows if not r.reason]
        runs = [plain_loop(rows, cfg)]
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        try:
            runs += [ray_data(rows, cfg, 1), ray_data(rows, cfg, cpus)]
        finally:
            ray.shutdown()

    one, full = runs[1], runs[2]
    scaling = full.rate / one.rate / cpus
    steady_scaling = full.steady_rate / one.steady_rate / cpus
    load = os.getloadavg()
    report(
        "prepare: aligned faces/s (dlib 68-point fit + similarity warp + JPEG, 48x48 synthetic FERPlus)",
        ["run", "workers", "faces", "end-to-end s", "faces/s end-to-end", "faces/s steady state",
         "CPU s: align actors / driver / Ray services / other processes"],
        [[r.name, r.workers, r.faces, round(r.total_s, 2), round(r.rate, 1), round(r.steady_rate, 1),
          " / ".join(f"{r.cpu.get(k, 0):.0f}" for k in ("align", "driver", "ray", "other")) if r.cpu else "-"]
         for r in runs],
        notes=(f"Scaling {cpus} actors vs 1 (fraction of linear): {scaling:.2f} end to end, "
               f"{steady_scaling:.2f} steady state; Ray x1 steady vs plain loop: {one.steady_rate / runs[0].rate:.2f}. "
               f"Load average during the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {cpus} CPUs "
               "(a shared machine: other jobs compete, so figures are noisy). With as many actors as CPUs, "
               "the driver (Ray Data's executor) and Ray's own processes take CPU from the actors."),
    )


if __name__ == "__main__":
    main()
