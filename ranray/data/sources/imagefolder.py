"""A generic image folder: ROOT/[train|val|test/]<class>/<image>, class folders named by expression.

Folder names are CLASS_NAMES or common synonyms (happy, sad, angry, surprised, fearful, ...); any
other name stops the job with the folder named, so that a typo never turns into a missing class;
so does a folder with no class folders (a flat folder of faces: there is no label to give them) or
no images at all, rather than preparing an empty dataset.
Without split folders, everything is "train". Keys are paths relative to ROOT. The driver lists the
folders into the work folder (ranray.data.sources.listing); workers read that listing in runs.
"""

from __future__ import annotations

from pathlib import Path

from ranray.config import CLASS_NAMES
from ranray.data.sources.common import (CLASS_SYNONYMS, IMAGE_EXTENSIONS, SourceError, require_dir,
                                        split_folders)
from ranray.data.sources.lines import SourcePlan
from ranray.data.sources.listing import ListingParser, write_listing


def plan_imagefolder(inputs: list[str], work: Path) -> SourcePlan:
    roots = [require_dir(p, "image folder") for p in inputs]
    listing = write_listing(work, ((root, _class_folders(root)) for root in roots))
    if listing.rows == 0:  # class folders that hold no images would prepare an empty dataset
        raise SourceError(f"imagefolder: the class folders under {', '.join(inputs)} hold no images "
                          f"({' '.join(IMAGE_EXTENSIONS)}); {EXPECTED}")
    return SourcePlan(groups=listing.groups, parser=ListingParser(tuple(map(str, roots)), True),
                      class_names=list(CLASS_NAMES), rows=listing.rows, extra={"roots": list(inputs)})


EXPECTED = (f"expected DIR/<class>/<images> or DIR/{{train,val,test}}/<class>/<images>, class folders named "
            f"{', '.join(sorted(CLASS_SYNONYMS))}")


def _class_folders(root: Path) -> list[tuple[str, int, Path]]:
    folders = []
    for split, folder in split_folders(root).items():
        class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
        if not class_dirs:
            raise SourceError(f"imagefolder: {_without_classes(folder)}; {EXPECTED}")
        for class_dir in class_dirs:
            label = CLASS_SYNONYMS.get(class_dir.name.lower())
            if label is None:
                raise SourceError(f"{class_dir}: '{class_dir.name}' is not an expression class "
                                  f"(known: {', '.join(sorted(CLASS_SYNONYMS))})")
            folders.append((split, label, class_dir))
    return folders


def _without_classes(folder: Path) -> str:
    """What a folder without class folders holds, for the error: a flat folder of faces is the usual case."""
    files = [p for p in folder.iterdir() if p.is_file()]
    images = sum(p.suffix.lower() in IMAGE_EXTENSIONS for p in files)
    if images:
        return f"found {images} images directly in {folder} and no class folders"
    if files:
        return f"found {len(files)} files in {folder}, none an image, and no class folders"
    return f"{folder} is empty"


def plan(cfg, work: Path) -> SourcePlan:
    return plan_imagefolder(cfg.inputs, work)
