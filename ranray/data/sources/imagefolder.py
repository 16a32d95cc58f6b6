"""A generic image folder: ROOT/[train|val|test/]<class>/<image>, class folders named by expression.

Folder names are CLASS_NAMES or common synonyms (happy, sad, angry, surprised, fearful, ...); any
other name stops the job with the folder named, so that a typo never turns into a missing class.
Without split folders, everything is "train". Keys are paths relative to ROOT. The driver lists the
folders into the work folder (ranray.data.sources.listing); workers read that listing in runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ranray.config import CLASS_NAMES
from ranray.data.sources.common import CLASS_SYNONYMS, SourceError, SourceRead, require_dir, split_folders
from ranray.data.sources.lines import SourcePlan, read_all
from ranray.data.sources.listing import ListingParser, write_listing


def plan_imagefolder(inputs: list[str], work: Path) -> SourcePlan:
    roots = [require_dir(p, "image folder") for p in inputs]
    listing = write_listing(work, ((root, _class_folders(root)) for root in roots))
    return SourcePlan(groups=listing.groups, parser=ListingParser(tuple(map(str, roots)), True),
                      class_names=list(CLASS_NAMES), rows=listing.rows, extra={"roots": list(inputs)})


def _class_folders(root: Path) -> list[tuple[str, int, Path]]:
    folders = []
    for split, folder in split_folders(root).items():
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            label = CLASS_SYNONYMS.get(class_dir.name.lower())
            if label is None:
                raise SourceError(f"{class_dir}: '{class_dir.name}' is not an expression class "
                                  f"(known: {', '.join(sorted(CLASS_SYNONYMS))})")
            folders.append((split, label, class_dir))
    return folders


def read_imagefolder(inputs: list[str]) -> SourceRead:
    with tempfile.TemporaryDirectory() as work:
        return read_all(plan_imagefolder(inputs, Path(work)))


def plan(cfg, work: Path) -> SourcePlan:
    return plan_imagefolder(cfg.inputs, work)


def read(cfg) -> SourceRead:
    return read_imagefolder(cfg.inputs)
