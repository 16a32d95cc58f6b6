"""FERPlus: fer2013.csv (emotion, pixels, Usage) + fer2013new.csv (Usage, Image name, 10 vote columns),
or the authors' FER2013Train/Valid/Test folders with label.csv (ranray.data.sources.ferplus_folders;
the labels RAN's published results used). The manifest's reader.label_source says which, and
reader.label_files the sha256 of each file read.

The two files are aligned row by row (row i of one describes row i of the other). Labels come from
the 10 crowd votes with the FERPlus authors' label modes (ranray.data.sources.ferplus_labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ranray.config import CLASS_NAMES
from ranray.data.sources.common import (IMAGE_PIXELS, SourceError, SourceRow, label_file_hashes,
                                        parse_csv_line, read_header, require_dir, require_file)
from ranray.data.sources.ferplus_folders import find_folders, plan_folders
from ranray.data.sources.ferplus_labels import EVAL_MODE, VOTE_COLUMNS, label_from_votes, reject
from ranray.data.sources.lines import LineGroup, SourcePlan, count_lines

FER_COLUMNS = ("pixels", "Usage")
FERPLUS_COLUMNS = ("Usage", "Image name") + VOTE_COLUMNS
MISALIGNED = "misaligned_row"

USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


def find_files(inputs: list[str]) -> tuple[Path, Path]:
    """(fer2013.csv, fer2013new.csv) from a folder holding both, or from two files in any order."""
    if len(inputs) == 1:
        folder = require_dir(inputs[0], "FERPlus folder")
        return (require_file(folder / "fer2013.csv", "fer2013.csv"),
                require_file(folder / "fer2013new.csv", "fer2013new.csv"))
    if len(inputs) != 2:
        raise SourceError(f"ferplus needs fer2013.csv and fer2013new.csv (or their folder), got {inputs}")
    paths = [require_file(p, "FERPlus csv") for p in inputs]
    # Tell them apart by content, not name: only the FERPlus label file has "Image name".
    has_names = ["Image name" in p.open(encoding="utf-8-sig").readline() for p in paths]
    if has_names.count(True) != 1:
        raise SourceError(f"ferplus: exactly one of {inputs} must be fer2013new.csv (the one with 'Image name')")
    new = paths[has_names.index(True)]
    return paths[1 - has_names.index(True)], new


def plan_ferplus(inputs: list[str], label_mode: str = "majority") -> SourcePlan:
    """The authors' FER2013{Train,Valid,Test}/label.csv folders when given their parent, else the csv pair."""
    folders = find_folders(inputs)
    if folders is not None:
        return plan_folders(folders, label_mode)
    fer_path, new_path = find_files(inputs)
    cols = _Columns(read_header(fer_path, FER_COLUMNS), read_header(new_path, FERPLUS_COLUMNS))
    group = LineGroup((str(fer_path), str(new_path)), skip=1)
    repeats = repeated_names(new_path, cols.name)
    return SourcePlan(groups=[group], parser=FerplusParser(str(fer_path), str(new_path), cols, label_mode, repeats),
                      class_names=list(CLASS_NAMES), rows=count_lines([group]),
                      extra={"files": [str(fer_path), str(new_path)], "label_source": "fer2013new.csv",
                             "eval_label_mode": EVAL_MODE, "repeated_names": len(repeats),
                             "label_files": label_file_hashes([str(fer_path), str(new_path)])})


def repeated_names(new_path: Path, name_col: int) -> dict[str, int]:
    """{image name: the line it first appears on} for names on more than one row (fer0006953.png is).

    Keys must be unique; such a name keeps its plain key on its first line and becomes
    "<name>@<line>" on the others (a subset list entry marks the first). FERPlus is 35,887 rows,
    so the names fit in memory here.
    """
    first: dict[str, int] = {}
    repeats: dict[str, int] = {}
    with new_path.open(encoding="utf-8-sig", errors="replace") as f:
        next(f, None)
        for line, text in enumerate(f, start=2):
            name = _field(parse_csv_line(text.rstrip("\r\n")), name_col)
            if not name:
                continue
            if name in first:
                repeats[name] = first[name]
            else:
                first[name] = line
    return repeats


@dataclass(frozen=True)
class FerplusParser:
    fer_path: str
    new_path: str
    cols: "_Columns"
    label_mode: str
    repeats: dict[str, int] = field(default_factory=dict)  # repeated_names

    def parse(self, group: int, line: int, texts: tuple[str, ...]) -> SourceRow:
        fer, new = (parse_csv_line(t) for t in texts)
        row = _row(line - 2, fer, new, self.cols, self.label_mode, Path(self.fer_path), Path(self.new_path))
        if self.repeats.get(row.key, line) != line:
            row.key = f"{row.key}@{line}"
        return row


class _Columns:
    def __init__(self, fer_header: list[str], new_header: list[str]):
        self.pixels = fer_header.index("pixels")
        self.fer_usage = fer_header.index("Usage")
        self.usage = new_header.index("Usage")
        self.name = new_header.index("Image name")
        self.votes = [new_header.index(c) for c in VOTE_COLUMNS]


def _field(row: list[str], i: int) -> str:
    return row[i].strip() if i < len(row) else ""


def _row(i: int, fer: list[str], new: list[str], cols: _Columns, label_mode: str, fer_path: Path,
         new_path: Path) -> SourceRow:
    line = i + 2  # the header is line 1
    name = _field(new, cols.name)
    usage = _field(new, cols.usage)
    row = SourceRow(key=name or f"row{i:06d}", split=USAGE_TO_SPLIT.get(usage, usage or "unknown"),
                    image_kind=IMAGE_PIXELS, pixels=_field(fer, cols.pixels))
    if _field(fer, cols.fer_usage) != usage:
        return reject(row, MISALIGNED, f"{fer_path} line {line} has Usage '{_field(fer, cols.fer_usage)}' but "
                                        f"{new_path} has '{usage}': the files are not aligned row by row")
    try:
        row.votes = [int(float(_field(new, c))) for c in cols.votes]
    except ValueError:
        return reject(row, "bad_votes", f"{new_path} line {line}: votes {[_field(new, c) for c in cols.votes]}")
    if usage not in USAGE_TO_SPLIT:
        return reject(row, "bad_usage", f"{new_path} line {line}: Usage '{usage}'")
    if not name:
        return reject(row, "not_face_row", f"{new_path} line {line}: empty Image name (a FERPlus non-face row)")
    return label_from_votes(row, label_mode, f"{new_path} line {line}")


def plan(cfg) -> SourcePlan:
    """The planner registry's entry point (cfg: PrepareConfig)."""
    return plan_ferplus(cfg.inputs, cfg.label_mode)
