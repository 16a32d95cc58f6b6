"""One reader per dataset format, each turning its inputs into uniform SourceRows.

PLANNERS maps PrepareConfig.source to a function (cfg: PrepareConfig, work: Path) -> SourcePlan: the
driver's lazy plan (line files in runs, parsed by the workers; `work` holds folder listings).
"""

from __future__ import annotations

from typing import Callable

from ranray.data.sources import affectnet, ferplus, identity, imagefolder, rafdb, recordio_source
from ranray.data.sources.common import RowReject, SourceError, SourceRow
from ranray.data.sources.lines import SourcePlan
from ranray.data.sources.subsets import mark_subsets

PLANNERS: dict[str, Callable[..., SourcePlan]] = {
    "ferplus": lambda cfg, work: ferplus.plan(cfg),
    "rafdb": lambda cfg, work: rafdb.plan(cfg),
    "affectnet": lambda cfg, work: affectnet.plan(cfg),
    "imagefolder": imagefolder.plan,
    "identity": identity.plan,
    "recordio": recordio_source.plan,
}

__all__ = ["PLANNERS", "SourcePlan", "RowReject", "SourceError", "SourceRow", "mark_subsets"]
