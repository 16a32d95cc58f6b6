"""Which checkpoint a (re)started worker group resumes from, and what each rank reads from it.

A checkpoint is a Ray checkpoint directory: rank 0's `state.pt` (model, optimizers, loader
position, loop state) and a `rank<r>.pt` per rank (its RNG streams, running sums, and whatever
else the task keeps per rank). A resume on another world size reads the files of the old ranks
it needs (read_rank_state): all of a checkpoint's rank files sit in its one directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray.train

from ranray.train.checkpoint import STATE_FILE, CheckpointError, load_checkpoint, verify_checkpoint
from ranray.train.collectives import broadcast

log = logging.getLogger("ranray.train")

RANK_FILE = "rank{rank}.pt"


def load_resume_state(rank: int) -> dict[str, Any] | None:
    """The newest good checkpoint Ray knows for this run: {"state", "rank_state", "path"} or None.

    Rank 0 picks it (the newest that verifies) and tells the others, so a half-written newest
    checkpoint sends every rank to the same older one.
    """
    latest = ray.train.get_checkpoint()
    if latest is None:
        return None
    chosen = broadcast(pick_good_checkpoint(latest) if rank == 0 else None)
    ckpt = ray.train.Checkpoint(path=chosen, filesystem=latest.filesystem)
    with ckpt.as_directory() as d:
        state = load_checkpoint(Path(d) / STATE_FILE)
        try:
            own = load_checkpoint(Path(d) / RANK_FILE.format(rank=rank))
        except CheckpointError as exc:
            # A new world size, or a lost file: the task decides whether it can go on without it.
            log.warning("rank %d: no usable rank state in %s (%s)", rank, chosen, exc)
            own = None
    return {"state": state, "rank_state": own, "path": chosen}


def read_rank_state(path: str, rank: int) -> dict[str, Any]:
    """Another rank's `rank<r>.pt` of checkpoint `path` (verified): what a resume on another world
    size needs, e.g. the Partial FC shards that overlap a new rank's classes."""
    fs = ray.train.get_context().get_storage().storage_filesystem
    with ray.train.Checkpoint(path=path, filesystem=fs).as_directory() as d:
        return load_checkpoint(Path(d) / RANK_FILE.format(rank=rank))


def pick_good_checkpoint(latest: ray.train.Checkpoint) -> str:
    """Path of `latest` if its state verifies, else of the newest older sibling that does."""
    import pyarrow.fs as pafs

    fs = latest.filesystem
    parent = latest.path.rstrip("/").rsplit("/", 1)[0]
    infos = fs.get_file_info(pafs.FileSelector(parent))
    siblings = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                       and i.base_name.startswith("checkpoint_") and i.path != latest.path), reverse=True)
    for path in [latest.path, *siblings]:
        with ray.train.Checkpoint(path=path, filesystem=fs).as_directory() as d:
            try:
                verify_checkpoint(Path(d) / STATE_FILE)
            except CheckpointError as exc:
                log.warning("not resuming from %s: %s", path, exc)
                continue
        if path != latest.path:
            log.warning("resuming from the older good checkpoint %s", path)
        return path
    raise CheckpointError(f"no checkpoint under {parent} verifies; delete the run directory to start afresh")
