"""FERPlus as its authors' trainer reads it: FER2013Train/, FER2013Valid/, FER2013Test/, each with
the PNGs (written by microsoft/FERPlus generate_training_data.py) and a label.csv:

    fer0000000.png,"(0, 0, 48, 48)",4,0,0,1,3,2,0,0,0,0      name, face box (x, y, w, h), 10 votes

About 8% of the rows carry other votes than fer2013new.csv. With the authors' majority rule this
source keeps 25,045 / 3,191 / 3,137 train / val / test rows of the full data (fer2013new.csv:
25,060 / 3,199 / 3,153); RAN's published lists are exactly these label.csv sets (train + val for
training). The votes go through the same label modes as the csv pair (ranray.data.sources.ferplus).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ranray.config import CLASS_NAMES
from ranray.data.schema import NUM_VOTES
from ranray.data.sources.common import SourceError, SourceRow, label_file_hashes, parse_csv_line, require_dir
from ranray.data.sources.ferplus_labels import EVAL_MODE, label_from_votes, reject
from ranray.data.sources.lines import LineGroup, SourcePlan, count_lines

LABEL_FILE = "label.csv"
FOLDER_SPLITS = {"FER2013Train": "train", "FER2013Valid": "val", "FER2013Test": "test"}
IMAGE_SIDE = 48  # FER2013's faces
LABEL_SOURCE = "label.csv"
_BOX = re.compile(r"^\(\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\s*\)$")


def find_folders(inputs: list[str]) -> dict[str, Path] | None:
    """{split: folder} when the input is the folder holding FER2013Train/ etc.; None for the csv pair."""
    if len(inputs) != 1 or not Path(inputs[0]).is_dir():
        return None
    root = Path(inputs[0])
    present = {name: root / name for name in FOLDER_SPLITS if (root / name / LABEL_FILE).is_file()}
    if not present:
        return None
    missing = sorted(set(FOLDER_SPLITS) - set(present))
    if missing:
        raise SourceError(f"ferplus: {root} has {sorted(present)} but not {missing} (each with {LABEL_FILE})")
    return {FOLDER_SPLITS[name]: require_dir(folder, "FERPlus split folder") for name, folder in present.items()}


def plan_folders(folders: dict[str, Path], label_mode: str) -> SourcePlan:
    groups = [LineGroup((str(folder / LABEL_FILE),)) for folder in folders.values()]
    parser = LabelCsvParser(tuple(folders), tuple(str(f) for f in folders.values()), label_mode)
    files = [g.files[0] for g in groups]
    return SourcePlan(groups=groups, parser=parser, class_names=list(CLASS_NAMES), rows=count_lines(groups),
                      extra={"files": files, "label_source": LABEL_SOURCE, "eval_label_mode": EVAL_MODE,
                             "label_files": label_file_hashes(files)})


@dataclass(frozen=True)
class LabelCsvParser:
    splits: tuple[str, ...]  # per group
    folders: tuple[str, ...]
    label_mode: str

    def parse(self, group: int, line: int, texts: tuple[str, ...]) -> SourceRow | None:
        fields = [f.strip() for f in parse_csv_line(texts[0])]
        if not any(fields):
            return None
        folder, split = Path(self.folders[group]), self.splits[group]
        where = f"{folder / LABEL_FILE} line {line}"
        name = fields[0]
        row = SourceRow(key=name or f"{folder.name}:{line}", split=split, path=str(folder / name))
        if len(fields) != 2 + NUM_VOTES:
            return reject(row, "bad_row", f"{where}: {len(fields)} fields, expected name, box and {NUM_VOTES} votes")
        box = _BOX.match(fields[1])
        if box is None:
            return reject(row, "bad_box", f"{where}: box {fields[1]!r} is not '(x, y, w, h)'")
        try:
            row.votes = [int(v) for v in fields[2:]]
        except ValueError:
            return reject(row, "bad_votes", f"{where}: votes {fields[2:]}")
        if any(v < 0 for v in row.votes):
            return reject(row, "bad_votes", f"{where}: negative votes {row.votes}")
        problem = _image_problem(Path(row.path), where)
        if problem:
            return reject(row, *problem)
        x, y, w, h = (int(v) for v in box.groups())
        row.box = [float(x), float(y), float(x + w), float(y + h)]
        return label_from_votes(row, self.label_mode, where)


def _image_problem(path: Path, where: str) -> tuple[str, str] | None:
    """(reason, detail) when the PNG is missing, corrupt or not 48x48. Decoded here, not only opened
    (a 48x48 PNG takes microseconds), so that a truncated file's reject names its label.csv line."""
    try:
        with Image.open(path) as img:
            if img.size != (IMAGE_SIDE, IMAGE_SIDE):
                return "bad_image_size", (f"{where}: {path} is {img.size[0]}x{img.size[1]}, FER2013 faces are "
                                          f"{IMAGE_SIDE}x{IMAGE_SIDE}")
            img.load()
    except FileNotFoundError:
        return "image_missing", f"{where}: {path} does not exist"
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
        return "corrupt_image", f"{where}: {path}: {type(err).__name__}: {err}"
    return None
