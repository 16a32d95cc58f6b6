"""A generic image folder: ROOT/[train|val|test/]<class>/<image>, class folders named by expression.

Folder names are CLASS_NAMES or common synonyms (happy, sad, angry, surprised, fearful, ...); any
other name stops the job with the folder named, so that a typo never turns into a missing class.
Without split folders, everything is "train". Keys are paths relative to ROOT.
"""

from __future__ import annotations

from pathlib import Path

from ranray.config import CLASS_NAMES
from ranray.data.sources.common import (CLASS_SYNONYMS, SourceError, SourceRead, SourceRow, image_files,
                                        one_hot, require_dir, split_folders)


def read_imagefolder(inputs: list[str]) -> SourceRead:
    rows: list[SourceRow] = []
    for root in (require_dir(p, "image folder") for p in inputs):
        for split, folder in split_folders(root).items():
            rows += _split_rows(root, split, folder)
    return SourceRead(rows=rows, class_names=list(CLASS_NAMES), extra={"roots": list(inputs)})


def _split_rows(root: Path, split: str, folder: Path) -> list[SourceRow]:
    rows = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = CLASS_SYNONYMS.get(class_dir.name.lower())
        if label is None:
            raise SourceError(f"{class_dir}: '{class_dir.name}' is not an expression class "
                              f"(known: {', '.join(sorted(CLASS_SYNONYMS))})")
        for path in image_files(class_dir):
            rows.append(SourceRow(key=str(path.relative_to(root)), split=split, label=label,
                                  target=one_hot(label), path=str(path)))
    return rows


def read(cfg) -> SourceRead:
    return read_imagefolder(cfg.inputs)
