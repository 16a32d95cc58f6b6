"""One reader per dataset format, each turning its inputs into uniform SourceRows.

PLANNERS maps PrepareConfig.source to a function (cfg: PrepareConfig, work: Path) -> SourcePlan: the
driver's lazy plan (line files in runs, parsed by the workers; `work` holds folder listings).
READERS maps it to (cfg) -> SourceRead: every row at once, parsed in this process (tests, small sets).
"""

from __future__ import annotations

from typing import Callable

from ranray.data.sources import affectnet, ferplus, identity, imagefolder, rafdb, recordio_source
from ranray.data.sources.common import RowReject, SourceError, SourceRead, SourceRow
from ranray.data.sources.lines import SourcePlan
from ranray.data.sources.subsets import mark_subsets

READERS: dict[str, Callable[..., SourceRead]] = {
    "ferplus": ferplus.read,
    "rafdb": rafdb.read,
    "affectnet": affectnet.read,
    "imagefolder": imagefolder.read,
    "identity": identity.read,
    "recordio": recordio_source.read,
}

PLANNERS: dict[str, Callable[..., SourcePlan]] = {
    "ferplus": lambda cfg, work: ferplus.plan(cfg),
    "rafdb": lambda cfg, work: rafdb.plan(cfg),
    "affectnet": lambda cfg, work: affectnet.plan(cfg),
    "imagefolder": imagefolder.plan,
    "identity": identity.plan,
    "recordio": recordio_source.plan,
}

__all__ = ["PLANNERS", "SourcePlan", "READERS", "RowReject", "SourceError", "SourceRead", "SourceRow", "mark_subsets"]
