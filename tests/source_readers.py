"""Every row of a source at once, parsed in this process: the tests' view of a reader.

`ranray prepare` never reads a source this way: it plans the rows lazily (ranray.data.sources.PLANNERS)
and its workers parse them. Here the same plan is parsed in full, so a test can look at every row.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ranray.data.sources import PLANNERS, SourceError, SourcePlan, SourceRow
from ranray.data.sources.affectnet import plan_affectnet
from ranray.data.sources.common import AFFECTNET_CLASSES
from ranray.data.sources.ferplus import MISALIGNED, plan_ferplus
from ranray.data.sources.identity import plan_identity
from ranray.data.sources.imagefolder import plan_imagefolder
from ranray.data.sources.lines import plan_rows
from ranray.data.sources.rafdb import plan_rafdb
from ranray.data.sources.recordio_source import plan_recordio


@dataclass
class SourceRead:
    """A reader's output: every input row, each either usable or carrying a reject reason."""

    rows: list[SourceRow]
    class_names: list[str]  # index -> name; for identity sources, the training identities
    extra: dict = field(default_factory=dict)  # reader-specific manifest entries


def read_all(plan: SourcePlan) -> SourceRead:
    return SourceRead(rows=list(plan_rows(plan)), class_names=plan.class_names, extra=plan.extra)


def read_source(cfg) -> SourceRead:
    """Every row of cfg's source (cfg: PrepareConfig), through the planner `ranray prepare` uses."""
    with tempfile.TemporaryDirectory() as work:
        return read_all(PLANNERS[cfg.source](cfg, Path(work)))


def read_ferplus(inputs: list[str], label_mode: str = "majority") -> SourceRead:
    """All rows at once; files that are out of step are an error here (prepare rejects such rows)."""
    read = read_all(plan_ferplus(inputs, label_mode))
    for row in read.rows:
        if row.reason == MISALIGNED:
            raise SourceError(row.detail)
    return read


def read_rafdb(inputs: list[str], detector: str = "given") -> SourceRead:
    return read_all(plan_rafdb(inputs, detector))


def read_affectnet(inputs: list[str], num_classes: int = len(AFFECTNET_CLASSES)) -> SourceRead:
    return read_all(plan_affectnet(inputs, num_classes))


def read_imagefolder(inputs: list[str]) -> SourceRead:
    with tempfile.TemporaryDirectory() as work:
        return read_all(plan_imagefolder(inputs, Path(work)))


def read_identity(inputs: list[str]) -> SourceRead:
    with tempfile.TemporaryDirectory() as work:
        return read_all(plan_identity(inputs, Path(work)))


def read_recordio(inputs: list[str]) -> SourceRead:
    return read_all(plan_recordio(inputs))
