"""What keeps a run the same run when its worker count changes between starts (docs/ELASTIC.md).

Ray Train restarts the worker group from the newest checkpoint with however many workers it got
(scaling.num_workers = [min, max]); the engine calls this module at every start and epoch start:

    global batch  the per-worker batch stays `batch_size`; the learning rate is scaled linearly with
                  the workers: lr x W / scaling.max_workers (optim.lr is the rate of the full group).
                  A fixed worker count gives the factor 1: nothing changes for a fixed run.
    schedule      the LR schedule is a function of the position in the epochs, not of optimizer
                  steps: a start sets every scheduler to epoch x (batches of a whole epoch on W)
                  plus the epoch's fraction used so far (the loader's global sample position), so
                  with another W (and so another step count per epoch) the schedule goes on where it
                  was. At epoch starts it is set again; in a fixed run both are what the step count
                  already is.
    refusals      what a checkpoint cannot be resumed with (another model, optimizer, class count)
                  is refused by key, naming both values, before the state is loaded or a step runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ranray.config import ConfigError, PretrainConfig, TrainConfig, flatten

BATCH_RULE = "per-worker batch kept; lr x workers / scaling.max_workers; schedule by epoch position"

# Keys whose value decides the shapes or kinds of the saved state: a resume with another is refused.
FIXED_KEYS: dict[type, tuple[str, ...]] = {
    TrainConfig: ("model.backbone", "model.num_classes", "model.variant", "optim.name"),
    PretrainConfig: ("backbone", "partial_fc.embedding_size", "optim.name"),
}


def lr_scale(world_size: int, cfg: TrainConfig | PretrainConfig) -> float:
    return world_size / cfg.scaling.max_workers


def schedule_step(loader: Any) -> int:
    """The scheduler step for the loader's position: epoch x whole-epoch batches + the part done.

    Without a world-size change in the epoch the part done is the batches handed out (exactly the
    steps taken); after one it is the epoch fraction used, in batches of this world size.
    """
    per_epoch = loader.full_epoch_batches()
    state = loader.state_dict()
    done = state["batches"] if not state["segments"] else round(loader.epoch_progress() * per_epoch)
    return state["epoch"] * per_epoch + done


def align_schedules(steppers: Iterable[tuple[Any, Any]], scale: float, step: int) -> None:
    """Set each (optimizer, LambdaLR) to schedule step `step` with base rates initial_lr x scale."""
    for optimizer, scheduler in steppers:
        scheduler.base_lrs = [group["initial_lr"] * scale for group in optimizer.param_groups]
        scheduler.last_epoch = step
        rates = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates  # what get_last_lr() reads (LambdaLR keeps it there)


def resume_summary(cfg: TrainConfig | PretrainConfig, world_size: int, task_state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint's manifest records so a resume can be checked without loading the state:
    the world size, the FIXED_KEYS values and the task's scalar chief-state keys (num_classes)."""
    values = flatten(cfg)
    scalars = {k: v for k, v in task_state.items() if isinstance(v, (bool, int, float, str))}
    return {"world_size": world_size, **{k: values[k] for k in FIXED_KEYS[type(cfg)]}, **scalars}


def refuse_changes(saved: dict[str, Any], now: dict[str, Any], where: str) -> None:
    """Refuse, naming the key and both values, a resume whose fixed values differ from the saved ones."""
    for key, value in now.items():
        if key != "world_size" and key in saved and saved[key] != value:
            raise ConfigError(f"config key '{key}' is {value!r} but checkpoint {where} was trained with "
                              f"{saved[key]!r}; resume with {key}={saved[key]} or start a new run (run.name)")


def check_resumable(state: dict[str, Any], now: dict[str, Any], path: str) -> None:
    """The worker's check of a loaded checkpoint (older ones without a summary: their config)."""
    saved = state.get("summary") or {k: v for k, v in flatten(state.get("config", {})).items()}
    refuse_changes(saved, now, path)


def check_run_dir(run_dir: Path, now: dict[str, Any]) -> None:
    """The driver's check, before Ray starts workers: the newest committed checkpoint's manifest."""
    from ranray.train.checkpoint import STATE_FILE, CheckpointError, read_manifest
    from ranray.train.commits import committed

    for record in reversed(committed(run_dir)):
        try:
            manifest = read_manifest(run_dir / record["checkpoint_dir_name"] / STATE_FILE)
        except CheckpointError:
            continue  # the workers fall back to an older checkpoint, and check what they load
        refuse_changes(manifest.get("summary") or {}, now, str(run_dir / record["checkpoint_dir_name"]))
        return


def start_record(world_size: int, cfg: TrainConfig | PretrainConfig, saved_world: int | None) -> dict[str, float]:
    """The MLflow metrics of a start: workers, global batch, LR factor (and the workers before)."""
    record = {"workers": float(world_size), "global_batch": float(world_size * cfg.batch_size),
              "lr_scale": lr_scale(world_size, cfg)}
    if saved_world is not None:
        record["workers_before"] = float(saved_world)
    return record
