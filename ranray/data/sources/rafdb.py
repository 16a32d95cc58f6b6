"""RAF-DB basic: EmoLabel/list_patition_label.txt ("train_00001.jpg 5" per line) + Image/{aligned,original}.

Labels 1..7 (Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral) become classes 0..6 in that
order (RAFDB_CLASSES): RAF-DB is classified 7-way, as published results are. Splits come from the file name prefix (train_ /
test_); RAF-DB has no validation split. The aligned images (100x100, file names with an
"_aligned" suffix) suit detector=given; the original photos suit hog or cnn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ranray.data.sources.common import (RAFDB_CLASSES, SourceError, SourceRow, one_hot,
                                        require_dir, require_file)
from ranray.data.sources.lines import LineGroup, SourcePlan, count_lines

LIST_NAME = "list_patition_label.txt"  # sic: the dataset's own spelling
PREFIX_TO_SPLIT = {"train": "train", "test": "test"}
# Which image folder fits which detector when the input is the dataset root.
IMAGE_FOLDERS = {"given": "aligned", "none": "aligned", "hog": "original", "cnn": "original"}


def resolve(inputs: list[str], detector: str) -> tuple[Path, Path]:
    """(label list, image folder) from [root], [list file], or [list file, image folder]."""
    first = Path(inputs[0])
    if first.is_dir():
        list_path = require_file(first / "EmoLabel" / LIST_NAME, "RAF-DB label list")
        root = first
    else:
        list_path = require_file(first, "RAF-DB label list")
        root = list_path.parent.parent  # basic/EmoLabel/<list> -> basic
    if len(inputs) > 2:
        raise SourceError(f"rafdb takes the dataset root, or the label list and an image folder; got {inputs}")
    images = Path(inputs[1]) if len(inputs) == 2 else root / "Image" / IMAGE_FOLDERS[detector]
    return list_path, require_dir(images, "RAF-DB image folder")


def image_path(folder: Path, name: str) -> Path:
    """The file for a list entry: the aligned set adds '_aligned' before the extension."""
    plain = folder / name
    if plain.exists():
        return plain
    stem, dot, ext = name.rpartition(".")
    return folder / f"{stem}_aligned{dot}{ext}"


def plan_rafdb(inputs: list[str], detector: str = "given") -> SourcePlan:
    list_path, folder = resolve(inputs, detector)
    group = LineGroup((str(list_path),))
    return SourcePlan(groups=[group], parser=RafdbParser(str(list_path), str(folder)), class_names=list(RAFDB_CLASSES),
                      rows=count_lines([group]), extra={"files": [str(list_path)], "image_folder": str(folder)})


@dataclass(frozen=True)
class RafdbParser:
    list_path: str
    folder: str

    def parse(self, group: int, line: int, texts: tuple[str, ...]) -> SourceRow | None:
        if not texts[0].strip():
            return None
        return _row(texts[0], line, Path(self.list_path), Path(self.folder))


def _row(line: str, line_no: int, list_path: Path, folder: Path) -> SourceRow:
    parts = line.split()
    name = parts[0]
    split = PREFIX_TO_SPLIT.get(name.split("_", 1)[0], "")
    row = SourceRow(key=name, split=split or "unknown", path=str(image_path(folder, name)))
    where = f"{list_path} line {line_no}"
    if len(parts) != 2 or not parts[1].isdigit():
        row.reason, row.detail = "bad_label", f"{where}: '{line.strip()}'"
    elif not 1 <= int(parts[1]) <= len(RAFDB_CLASSES):
        row.reason, row.detail = "bad_label", f"{where}: label {parts[1]} not in 1..7"
    elif not split:
        row.reason, row.detail = "bad_split", f"{where}: '{name}' starts with neither train_ nor test_"
    else:
        row.label = int(parts[1]) - 1
        row.target = one_hot(row.label, len(RAFDB_CLASSES))
    return row


def plan(cfg) -> SourcePlan:
    return plan_rafdb(cfg.inputs, cfg.detector)
