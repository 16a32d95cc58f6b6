"""One reader per dataset format, each turning its inputs into uniform SourceRows.

READERS maps PrepareConfig.source to a function (cfg: PrepareConfig) -> SourceRead.
"""

from __future__ import annotations

from typing import Callable

from ranray.data.sources import affectnet, ferplus, identity, imagefolder, rafdb, recordio_source
from ranray.data.sources.common import RowReject, SourceError, SourceRead, SourceRow
from ranray.data.sources.subsets import mark_subsets

READERS: dict[str, Callable[..., SourceRead]] = {
    "ferplus": ferplus.read,
    "rafdb": rafdb.read,
    "affectnet": affectnet.read,
    "imagefolder": imagefolder.read,
    "identity": identity.read,
    "recordio": recordio_source.read,
}

__all__ = ["READERS", "RowReject", "SourceError", "SourceRead", "SourceRow", "mark_subsets"]
