"""AffectNet: training.csv / validation.csv with the face box and 68 landmarks given per image.

Columns: subDirectory_filePath, face_x, face_y, face_width, face_height, facial_landmarks
("x;y;x;y;..." 136 values), expression (0..10), valence, arousal. Images live under
Manually_Annotated_Images/ (or the folder given as an input). Expressions 0..7 are the classes in
AffectNet's own order (AFFECTNET_CLASSES); published results are 8-way or 7-way (without contempt:
PrepareConfig.affectnet_classes=7 rejects contempt rows as "label_contempt"); 8 None, 9 Uncertain
and 10 No-Face are rejected with their reason.
The csv file's name picks the split: training -> train, validation -> val (AffectNet's validation
set is the test set of the papers; point TrainConfig.data.test_split at "val" to report on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ranray.data.schema import NUM_LANDMARKS
from ranray.data.sources.common import (AFFECTNET_CLASSES, EXCLUDED_CODES, SourceError, SourceRow,
                                        one_hot, parse_csv_line, read_header, require_dir, require_file)
from ranray.data.sources.lines import LineGroup, SourcePlan, count_lines

COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
           "expression")
STEM_TO_SPLIT = {"training": "train", "train": "train", "validation": "val", "val": "val", "test": "test"}
IMAGE_FOLDER = "Manually_Annotated_Images"


def resolve(inputs: list[str]) -> tuple[list[Path], Path]:
    csvs = [require_file(p, "AffectNet csv") for p in inputs if p.lower().endswith(".csv")]
    folders = [p for p in inputs if not p.lower().endswith(".csv")]
    if not csvs or len(folders) > 1:
        raise SourceError(f"affectnet takes one or more csv files and at most one image folder; got {inputs}")
    images = Path(folders[0]) if folders else csvs[0].parent / IMAGE_FOLDER
    for p in csvs:
        if p.stem.lower() not in STEM_TO_SPLIT:
            raise SourceError(f"{p}: cannot tell the split from the name (expected one of {sorted(STEM_TO_SPLIT)})")
    return csvs, require_dir(images, "AffectNet image folder")


def plan_affectnet(inputs: list[str], num_classes: int = len(AFFECTNET_CLASSES)) -> SourcePlan:
    csvs, folder = resolve(inputs)
    groups, columns = [], []
    for path in csvs:
        header = read_header(path, COLUMNS)
        columns.append({name: header.index(name) for name in COLUMNS})
        groups.append(LineGroup((str(path),), skip=1))
    splits = [STEM_TO_SPLIT[p.stem.lower()] for p in csvs]
    parser = AffectNetParser(tuple(str(p) for p in csvs), tuple(columns), tuple(splits), str(folder), num_classes)
    return SourcePlan(groups=groups, parser=parser, class_names=list(AFFECTNET_CLASSES[:num_classes]),
                      rows=count_lines(groups),
                      extra={"files": [str(p) for p in csvs], "image_folder": str(folder)})


@dataclass(frozen=True)
class AffectNetParser:
    files: tuple[str, ...]
    columns: tuple[dict[str, int], ...]  # per csv: column name -> index
    splits: tuple[str, ...]  # per csv
    folder: str
    num_classes: int  # 8, or 7 without contempt

    def parse(self, group: int, line: int, texts: tuple[str, ...]) -> SourceRow:
        return _row(parse_csv_line(texts[0]), line, Path(self.files[group]), self.columns[group],
                    self.splits[group], Path(self.folder), self.num_classes)


def _row(r: list[str], line: int, path: Path, col: dict[str, int], split: str, folder: Path,
         num_classes: int) -> SourceRow:
    def get(name: str) -> str:
        i = col[name]
        return r[i].strip() if i < len(r) else ""

    rel = get("subDirectory_filePath")
    row = SourceRow(key=rel or f"{path.name}:{line}", split=split, path=str(folder / rel))
    where = f"{path} line {line}"
    try:
        code = int(float(get("expression")))
        x, y, w, h = (float(get(c)) for c in ("face_x", "face_y", "face_width", "face_height"))
        marks = [float(v) for v in get("facial_landmarks").split(";") if v.strip()]
    except ValueError as err:
        row.reason, row.detail = "bad_annotation", f"{where}: {err}"
        return row
    excluded = EXCLUDED_CODES["affectnet"]
    if code in excluded:
        row.reason, row.detail = excluded[code], f"{where}: expression {code}"
    elif code == AFFECTNET_CLASSES.index("contempt") and num_classes < len(AFFECTNET_CLASSES):
        row.reason, row.detail = "label_contempt", f"{where}: contempt is left out of the 7-class set"
    elif not 0 <= code < num_classes:
        row.reason, row.detail = "bad_label", f"{where}: expression {code}"
    elif not rel:
        row.reason, row.detail = "bad_annotation", f"{where}: empty subDirectory_filePath"
    elif w <= 0 or h <= 0:
        row.reason, row.detail = "bad_box", f"{where}: face box {x, y, w, h}"
    else:
        row.label = code
        row.target = one_hot(code, num_classes)
        row.box = [x, y, x + w, y + h]
        # Given landmarks are a fallback for a failed predictor fit; a malformed list is ignored.
        row.landmarks = marks if len(marks) == 2 * NUM_LANDMARKS else []
    return row


def plan(cfg) -> SourcePlan:
    return plan_affectnet(cfg.inputs, cfg.affectnet_classes)
