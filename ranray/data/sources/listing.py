"""Image folders as listings: the driver walks the folders once and writes one JSON line per image
(split, label, path relative to its root) into the prepare's work folder; that listing is then a
line file like any csv, cut into runs and read by the workers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable

from ranray.data.sources.common import SourceRow, one_hot, walk_images
from ranray.data.sources.lines import LineGroup

LISTING = "listing-{}.jsonl"


class ListingWriter:
    """listing-<n>.jsonl per input root, written line by line (nothing kept per image)."""

    def __init__(self, work: Path):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.groups: list[LineGroup] = []
        self.rows = 0

    def root(self, index: int) -> tuple[Path, IO[str]]:
        path = self.work / LISTING.format(index)
        self.groups.append(LineGroup((str(path),)))
        return path, path.open("w", encoding="utf-8")

    def add(self, out: IO[str], split: str, label: int, root: Path, folder: Path) -> None:
        base = folder.relative_to(root).as_posix()
        for rel in walk_images(folder):
            out.write(json.dumps([split, label, f"{base}/{rel}"]) + "\n")
            self.rows += 1


def write_listing(work: Path, roots: Iterable[tuple[Path, list[tuple[str, int, Path]]]]) -> ListingWriter:
    """roots: (root, [(split, label, class or identity folder), ...]) in label order."""
    writer = ListingWriter(work)
    for index, (root, folders) in enumerate(roots):
        _, out = writer.root(index)
        with out:
            for split, label, folder in folders:
                writer.add(out, split, label, root, folder)
    return writer


@dataclass(frozen=True)
class ListingParser:
    roots: tuple[str, ...]  # per listing (group)
    one_hot_targets: bool  # expression folders carry a one-hot target, identity folders none

    def parse(self, group: int, line: int, texts: tuple[str, ...]) -> SourceRow:
        split, label, rel = json.loads(texts[0])
        row = SourceRow(key=rel, split=split, label=label, path=str(Path(self.roots[group]) / rel))
        if self.one_hot_targets:
            row.target = one_hot(label)
        return row
