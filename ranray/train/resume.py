"""Which checkpoint a (re)started run resumes from, and what each rank reads from it; no runtime here.

A checkpoint is a folder `checkpoint_<step>_g<generation>`: rank 0's `state.pt` (model, optimizers,
loader position, loop state) and a `rank<r>.pt` per rank (its RNG streams, running sums, and
whatever else the task keeps per rank). A resume on another world size reads the files of the old
ranks it needs (Runtime.read_rank_state): all of a checkpoint's rank files sit in its one folder.

The runtimes list the candidates (Ray: the checkpoint Ray Train registered last, then its older
siblings; local: the run directory's checkpoint folders) and open them (Ray's storage may be
remote); the choice and the reading are here, once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from ranray.train.checkpoint import STATE_FILE, CheckpointError, load_checkpoint, verify_checkpoint

log = logging.getLogger("ranray.train")

RANK_FILE = "rank{rank}.pt"
CHECKPOINT_PREFIX = "checkpoint_"

OpenFolder = Callable[[str], AbstractContextManager[Path]]  # a checkpoint path -> its local folder


def pick_good_checkpoint(candidates: Sequence[str], open_folder: OpenFolder) -> str:
    """The first of `candidates` (newest first) whose state verifies."""
    for path in candidates:
        with open_folder(path) as d:
            try:
                verify_checkpoint(Path(d) / STATE_FILE)
            except CheckpointError as exc:
                log.warning("not resuming from %s: %s", path, exc)
                continue
        if path != candidates[0]:
            log.warning("resuming from the older good checkpoint %s", path)
        return path
    parent = candidates[0].rstrip("/").rsplit("/", 1)[0]
    raise CheckpointError(f"no checkpoint under {parent} verifies; delete the run directory to start afresh")


def read_resume_state(folder: Path, path: str, rank: int) -> dict[str, Any]:
    """{"state", "rank_state", "path"} of the checkpoint in `folder` for `rank`; rank_state is None
    when this rank has no usable file (another world size, or a lost file)."""
    state = load_checkpoint(folder / STATE_FILE)
    try:
        own = load_checkpoint(folder / RANK_FILE.format(rank=rank))
    except CheckpointError as exc:
        # The task decides whether it can go on without it.
        log.warning("rank %d: no usable rank state in %s (%s)", rank, path, exc)
        own = None
    return {"state": state, "rank_state": own, "path": path}


def read_rank_file(folder: Path, rank: int) -> dict[str, Any]:
    return load_checkpoint(folder / RANK_FILE.format(rank=rank))
