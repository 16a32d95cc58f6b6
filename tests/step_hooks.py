"""Engine hooks the tests own: per-rank step records and injected faults.

Jobs name them in `run.hooks` ("step_hooks:StepsLog"); conftest puts this folder on the
PYTHONPATH of every Ray process the tests start, so workers, job drivers and cluster nodes import
them. A fault is a factory per case (hooks are built without arguments).

`steps/rank<r>.log` (StepsLog): "start <generation> <resume step>" at each start of a worker,
"step <n> <epoch> <digest of the batch keys>" after each step; PretrainStepsLog adds
"shard <first class> <end class> <digest>" of the rank's class centres at each start and
"saved <step> <digest>" after each committed checkpoint. `committed_steps` reads the lineage of
the final model back from such a log (also from KeysLog's, whose lines carry the batch keys).
ShardDump writes each rank's restored Partial FC shard at each start (elastic resharding tests).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from ranray.train.engine import Engine, Hook

STEPS_DIR = "steps"
FAULTS_DIR = "faults"


class StepsLog(Hook):
    def on_start(self, e: Engine) -> None:
        path = e.run_dir / STEPS_DIR / f"rank{e.rank}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1)
        self.file.write(f"start {e.state.generation} {e.state.step}\n")

    def on_step(self, e: Engine, batch: dict) -> None:
        digest = hashlib.sha1("\0".join(batch["keys"]).encode()).hexdigest()[:16]
        self.file.write(f"step {e.state.step} {e.state.epoch} {digest}\n")

    def on_exit(self, e: Engine) -> None:
        if hasattr(self, "file"):
            self.file.close()


def shard_digest(e: Engine) -> str:
    return hashlib.sha1(e.task.head.weight.detach().cpu().numpy().tobytes()).hexdigest()[:16]


class PretrainStepsLog(StepsLog):
    def on_start(self, e: Engine) -> None:
        super().on_start(e)
        head = e.task.head
        self.file.write(f"shard {head.class_start} {head.class_end} {shard_digest(e)}\n")

    def on_report(self, e: Engine) -> None:
        # Paired with the "shard" line of a later start: a resume restored the shard saved here.
        self.file.write(f"saved {e.state.step} {shard_digest(e)}\n")


RESHARD_DIR = "reshard"


class ShardDump(Hook):
    """`reshard/g<generation>_rank<r>.pt` at each start: the rank's class range, centres and its
    optimizer's per-class state, as restored (to compare with the checkpoint bit for bit)."""

    def on_start(self, e: Engine) -> None:
        head, opt = e.task.head, e.task.head_optimizer
        state = {k: v.detach().cpu().clone() for k, v in opt.state.get(head.weight, {}).items()
                 if isinstance(v, torch.Tensor) and v.dim() >= 1}
        path = e.run_dir / RESHARD_DIR / f"g{e.state.generation}_rank{e.rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"range": (head.class_start, head.class_end), "weight": head.weight.detach().cpu().clone(),
                    "optimizer": state, "step": e.state.step, "world_size": e.world_size,
                    "lr": [g["lr"] for g in opt.param_groups]}, path)


class KeysLog(Hook):
    """`keys/rank<r>.log`: "start <generation> <resume step> <world size> <unix time>" at each start,
    then per step "step <n> <epoch> <key,key,...> <unix time>": which samples each step used, and when."""

    def on_start(self, e: Engine) -> None:
        path = e.run_dir / "keys" / f"rank{e.rank}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1)
        self.file.write(f"start {e.state.generation} {e.state.step} {e.world_size} {time.time():.3f}\n")

    def on_step(self, e: Engine, batch: dict) -> None:
        self.file.write(f"step {e.state.step} {e.state.epoch} {','.join(batch['keys'])} {time.time():.3f}\n")

    def on_exit(self, e: Engine) -> None:
        if hasattr(self, "file"):
            self.file.close()


class InjectedFault(RuntimeError):
    """Raised once by FailOnce, to exercise FailureConfig and resumption."""


class FailOnce(Hook):
    """Rank `rank` raises after step `step`, once per run: a marker file lets the restarted group pass."""

    def __init__(self, step: int, rank: int = 0):
        self.step, self.rank = step, rank

    def on_step(self, e: Engine, batch: dict) -> None:
        if e.state.step != self.step or e.rank != self.rank:
            return
        marker = e.run_dir / FAULTS_DIR / f"fail_at_step_{self.step}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise InjectedFault(f"fail_at_step: rank {e.rank} fails after step {e.state.step}")


def fail_at_step_1() -> FailOnce:
    return FailOnce(1)


def fail_at_step_3() -> FailOnce:
    return FailOnce(3)


def fail_at_step_5() -> FailOnce:
    return FailOnce(5)


def fail_at_step_5_on_rank_1() -> FailOnce:
    return FailOnce(5, rank=1)


def fail_at_step_9_on_rank_1() -> FailOnce:
    return FailOnce(9, rank=1)


def committed_steps(path: str | Path) -> list[tuple[int, int, str]]:
    """The (step, epoch, keys digest) lineage of the final model from a steps log.

    A start at step S discards what the log holds after S: that work was lost with the failed
    group and redone. A step that appears twice in the result was applied twice.
    """
    lineage: list[tuple[int, int, str]] = []
    for line in Path(path).read_text().splitlines():
        kind, *fields = line.split()
        if kind == "start":
            resume_step = int(fields[1])
            lineage = [entry for entry in lineage if entry[0] <= resume_step]
        elif kind == "step":
            lineage.append((int(fields[0]), int(fields[1]), fields[2]))
    return lineage


def committed_batches(run_dir: str | Path) -> list[tuple[int, int, list[str]]]:
    """(step, epoch, keys) of every rank's batches that the final model holds, from KeysLog files.

    Ranks come and go with the world size, so which starts discarded what is read from rank 0's
    log (rank 0 is in every group): a batch of step S trained after start (g, r) is kept unless a
    later start resumed from a step before S. Assumes each (generation, resume step) starts once.
    """
    logs = {int(p.stem[len("rank"):]): p.read_text().splitlines() for p in (Path(run_dir) / "keys").glob("rank*.log")}
    starts = [tuple(int(v) for v in line.split()[1:3]) for line in logs[0] if line.startswith("start ")]
    kept = []
    for lines in logs.values():
        later: list[int] = []
        for line in lines:
            kind, *fields = line.split()
            if kind == "start":
                position = starts.index((int(fields[0]), int(fields[1])))
                later = [resume for _, resume in starts[position + 1:]]
            elif all(resume >= int(fields[0]) for resume in later):
                kept.append((int(fields[0]), int(fields[1]), fields[2].split(",")))
    return kept
