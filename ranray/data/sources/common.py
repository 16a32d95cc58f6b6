"""What every dataset reader produces: uniform SourceRows, plus the shared class-order table.

Readers plan in the driver, before Ray starts, so that structural problems (a missing column, a
missing file, an unknown class folder) stop the job with a message naming the file; the rows
themselves are parsed by the workers (ranray.data.sources.lines). Problems of a single row (bad
votes, an excluded class, a non-face row, a line that is not UTF-8) never stop it: the row carries
a reject reason and ends up in rejects.parquet.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


from ranray.config import CLASS_NAMES, ConfigError

IMAGE_FILE = "file"  # the row's image is the file at `path`
IMAGE_PIXELS = "pixels"  # the row's image is `pixels`: space-separated grayscale values (FER2013)
IMAGE_RECORD = "record"  # the row's image is in the RecordIO record at byte `offset` of the .rec at `path`
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class SourceError(ConfigError):
    """An input is structurally unusable (missing file or column, unknown class folder).

    A ConfigError, so the CLI reports it in one line before Ray starts.
    """


class RowReject(Exception):
    """One row cannot be used; it goes to the rejects table with `reason` (machine-readable)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SourceRow:
    key: str  # unique within the source; file name or csv row; matched by subset lists
    split: str
    label: int = -1  # class index in CLASS_NAMES order (expressions) or identity index
    target: list[float] = field(default_factory=list)  # per-class distribution; empty: one-hot of label
    votes: list[int] = field(default_factory=list)  # raw FERPlus votes, or empty
    image_kind: str = IMAGE_FILE
    path: str = ""
    pixels: str = ""
    offset: int = -1  # IMAGE_RECORD: the record's byte offset in `path` (from train.idx)
    box: list[float] = field(default_factory=list)  # given face box x0, y0, x1, y1 (AffectNet)
    landmarks: list[float] = field(default_factory=list)  # given 68 landmarks, flat (AffectNet)
    flags: int = 0
    reason: str = ""  # set by the reader when the row is rejected before alignment
    detail: str = ""


# Each expression dataset's classes in its own label order: published results use each dataset's
# own class set (RAF-DB 7-way, AffectNet 7- or 8-way, FERPlus 8-way), so the model's head, the
# confusion matrices and the per-class tables follow the dataset, not one project-wide list.
# FERPlus and image folders use CLASS_NAMES.
RAFDB_CLASSES = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")  # labels 1..7
AFFECTNET_CLASSES = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt")  # 0..7
# FER2013's own 7 labels (0 Angry, 1 Disgust, 2 Fear, 3 Happy, 4 Sad, 5 Surprise, 6 Neutral) onto
# CLASS_NAMES: FERPlus replaces them by votes; the table is for writing fer2013.csv.
CLASS_TABLES: dict[str, dict[int, int]] = {
    "fer2013": {0: 4, 1: 5, 2: 6, 3: 1, 4: 3, 5: 2, 6: 0},
}
EXCLUDED_CODES: dict[str, dict[int, str]] = {
    "affectnet": {8: "label_none", 9: "label_uncertain", 10: "label_no_face"},
}


# Folder names accepted for the image-folder source, besides CLASS_NAMES themselves.
CLASS_SYNONYMS = {
    "neutral": 0, "happy": 1, "happiness": 1, "surprise": 2, "surprised": 2, "sad": 3, "sadness": 3,
    "anger": 4, "angry": 4, "disgust": 5, "disgusted": 5, "fear": 6, "fearful": 6, "afraid": 6,
    "contempt": 7,
}
assert all(CLASS_SYNONYMS[name] == i for i, name in enumerate(CLASS_NAMES))


def require_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"{what} not found: {p}")
    return p


def require_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise SourceError(f"{what} not found or not a folder: {p}")
    return p


def read_header(path: Path, required: tuple[str, ...]) -> list[str]:
    """A csv file's header line (the rest is not read); a missing column is an error naming the file and column."""
    with path.open("rb") as f:
        first = f.readline()
    try:
        header = [h.strip() for h in parse_csv_line(first.decode("utf-8-sig").rstrip("\r\n"))]
    except UnicodeDecodeError as err:
        raise SourceError(f"{path}: the header line is not UTF-8 ({err})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise SourceError(f"{path}: missing column(s) {missing} (header: {header})")
    return header


def parse_csv_line(text: str) -> list[str]:
    return next(csv.reader([text]), [])


def walk_images(folder: Path, prefix: str = "") -> Iterator[str]:
    """Image files under folder as relative paths, depth first in sorted order; one directory's
    names in memory at a time (an identity set's listing never is)."""
    with os.scandir(folder) as it:
        entries = sorted((e.name, e.is_dir()) for e in it)
    for name, is_dir in entries:
        if is_dir:
            yield from walk_images(folder / name, f"{prefix}{name}/")
        elif Path(name).suffix.lower() in IMAGE_EXTENSIONS:
            yield prefix + name


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The file's sha256 hex digest, streamed (a label csv can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def label_file_hashes(paths: list[str]) -> dict[str, str]:
    """{path relative to the files' common folder: sha256}: the manifest then says which label files a
    dataset was made from (FERPlus's label.csv and fer2013new.csv disagree on about 8% of rows)."""
    base = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return {Path(os.path.relpath(os.path.abspath(p), base)).as_posix(): sha256_file(p) for p in paths}


def one_hot(label: int, num_classes: int = len(CLASS_NAMES)) -> list[float]:
    target = [0.0] * num_classes
    target[label] = 1.0
    return target


SPLIT_NAMES = ("train", "val", "test")


def split_folders(root: Path) -> dict[str, Path]:
    """root/{train,val,test}/... when such folders exist, else the whole root as "train"."""
    found = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()}
    return found or {"train": root}
