"""FERPlus: fer2013.csv (emotion, pixels, Usage) + fer2013new.csv (Usage, Image name, 10 vote columns),
or the authors' FER2013Train/Valid/Test folders with label.csv (ranray.data.sources.ferplus_folders;
the labels RAN's published results used). The manifest's reader.label_source says which, and
reader.label_files the sha256 of each file read.

The two files are aligned row by row (row i of one describes row i of the other). Labels come from
the 10 crowd votes with the label modes of the FERPlus authors (Barsoum et al. 2016, the
`_process_data` of github.com/microsoft/FERPlus): votes of 1 are zeroed as outliers first; training
rows use the configured mode, validation and test rows always `majority`; a row whose processed
top class is `unknown` or `NF` (non-face) is dropped, here as a reject with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ranray.config import CLASS_NAMES
from ranray.data.schema import NUM_VOTES
from ranray.data.sources.common import (IMAGE_PIXELS, SourceError, SourceRead, SourceRow, label_file_hashes,
                                        parse_csv_line, read_header, require_dir, require_file)
from ranray.data.sources.lines import LineGroup, SourcePlan, count_lines, read_all

FER_COLUMNS = ("pixels", "Usage")
VOTE_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
                "unknown", "NF")
FERPLUS_COLUMNS = ("Usage", "Image name") + VOTE_COLUMNS
assert VOTE_COLUMNS[:len(CLASS_NAMES)] == CLASS_NAMES and len(VOTE_COLUMNS) == NUM_VOTES
UNKNOWN, NOT_FACE = 8, 9
MISALIGNED = "misaligned_row"

USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
EVAL_MODE = "majority"  # the FERPlus authors evaluate every mode against majority labels


# ---------------------------------------------------------------------------------------------
# Label modes: each takes the 10 votes after single-vote removal and returns the 10-way emotion
# vector, or None where the authors force the row to "unknown".
# ---------------------------------------------------------------------------------------------


def _majority(raw: list[float], total: float) -> list[float] | None:
    top = max(raw)
    if top > 0.5 * total:  # strictly more than half of the (kept) votes
        emotion = [0.0] * len(raw)
        emotion[raw.index(top)] = top
        return emotion
    return None


def _probability(raw: list[float], total: float) -> list[float] | None:
    """The authors' loop, kept as written: take the top classes until 75% of the votes (at most 3).

    Unknown or NF tied at the current top ends the loop; if a real emotion was taken before it,
    the unknown/NF share is dropped again.
    """
    raw = list(raw)
    emotion = [0.0] * len(raw)
    taken, count, valid = 0.0, 0, True
    while taken < 0.75 * total and count < 3 and valid:
        top = max(raw)
        for i in range(len(raw)):
            if raw[i] == top:
                emotion[i] = top
                raw[i] = 0.0
                taken += emotion[i]
                count += 1
                if i >= UNKNOWN:
                    valid = False
                    if sum(emotion) > top:
                        emotion[i] = 0.0
                        count -= 1
                    break
    if sum(emotion) <= 0.5 * total or count > 3:
        return None
    return emotion


def _multi_target(raw: list[float], total: float) -> list[float] | None:
    """Every class with at least 30% of the votes, equal to its vote share."""
    emotion = [v if v >= 0.3 * total else 0.0 for v in raw]
    return emotion if sum(emotion) > 0.5 * total else None


LABEL_MODES: dict[str, Callable[[list[float], float], list[float] | None]] = {
    "majority": _majority,
    "probability": _probability,  # the target is the same; the loss samples a label from it
    "crossentropy": _probability,  # the target is the same; the loss is soft cross-entropy
    "multi_target": _multi_target,
}
TOP_CLASS_REASONS = {UNKNOWN: "label_unknown", NOT_FACE: "label_not_face"}


def ferplus_target(votes: list[int], mode: str) -> tuple[list[float], str]:
    """(8-class target distribution, "") for a usable row, ([], reject reason) otherwise."""
    raw = [0.0 if v <= 1 else float(v) for v in votes]  # single votes are outliers
    emotion = LABEL_MODES[mode](raw, sum(raw))
    if emotion is None:
        return [], "label_no_consensus"
    top = max(range(len(emotion)), key=lambda i: (emotion[i], -i))  # first maximum, as np.argmax
    if top in TOP_CLASS_REASONS:
        return [], TOP_CLASS_REASONS[top]
    kept = emotion[:len(CLASS_NAMES)]
    total = sum(kept)
    return [v / total for v in kept], ""


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
    from ranray.data.sources.ferplus_folders import find_folders, plan_folders

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


def read_ferplus(inputs: list[str], label_mode: str = "majority") -> SourceRead:
    """All rows at once; files that are out of step are an error here (prepare rejects such rows)."""
    read = read_all(plan_ferplus(inputs, label_mode))
    for row in read.rows:
        if row.reason == MISALIGNED:
            raise SourceError(row.detail)
    return read


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
        return _reject(row, MISALIGNED, f"{fer_path} line {line} has Usage '{_field(fer, cols.fer_usage)}' but "
                                        f"{new_path} has '{usage}': the files are not aligned row by row")
    try:
        row.votes = [int(float(_field(new, c))) for c in cols.votes]
    except ValueError:
        return _reject(row, "bad_votes", f"{new_path} line {line}: votes {[_field(new, c) for c in cols.votes]}")
    if usage not in USAGE_TO_SPLIT:
        return _reject(row, "bad_usage", f"{new_path} line {line}: Usage '{usage}'")
    if not name:
        return _reject(row, "not_face_row", f"{new_path} line {line}: empty Image name (a FERPlus non-face row)")
    return label_from_votes(row, label_mode, f"{new_path} line {line}")


def label_from_votes(row: SourceRow, label_mode: str, where: str) -> SourceRow:
    """The row's target and label from its votes (training rows in `label_mode`, the rest majority),
    or a reject naming `where`."""
    mode = label_mode if row.split == "train" else EVAL_MODE
    target, reason = ferplus_target(row.votes, mode)
    if reason:
        return _reject(row, reason, f"{where}: votes {row.votes} ({mode})")
    row.target = target
    row.label = max(range(len(target)), key=lambda k: (target[k], -k))
    return row


def _reject(row: SourceRow, reason: str, detail: str) -> SourceRow:
    row.reason, row.detail = reason, detail
    return row


def plan(cfg) -> SourcePlan:
    """The planner registry's entry point (cfg: PrepareConfig)."""
    return plan_ferplus(cfg.inputs, cfg.label_mode)


def read(cfg) -> SourceRead:
    """The reader registry's entry point (cfg: PrepareConfig)."""
    return read_ferplus(cfg.inputs, cfg.label_mode)
