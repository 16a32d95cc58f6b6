"""Line files read in pieces: every source is planned as runs of lines of text files, cut by byte offset.

A csv, a label list, a RecordIO .idx or the listing of an image folder is a "line file". The driver
cuts each into runs ("segments") of a fixed number of lines by scanning it for newlines in chunks,
keeping only the byte offset of every run's first line: nothing per row stays in memory. A worker
reads one run by its byte range and hands the lines to the source's RowParser. Files that are
aligned line by line (FERPlus: fer2013.csv and fer2013new.csv) form a group and are cut at the same
line numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np

from ranray.data.sources.common import SourceError, SourceRow

CHUNK_BYTES = 1 << 22
NEWLINE = 10


class RowParser(Protocol):
    """Source-specific: one line (one decoded text per file of its group) -> a SourceRow, or None for
    a line that holds no row (a blank line, a RecordIO identity record)."""

    def parse(self, group: int, line: int, texts: tuple[str, ...]) -> SourceRow | None: ...


@dataclass(frozen=True)
class LineGroup:
    files: tuple[str, ...]  # aligned line by line
    skip: int = 0  # header lines


def line_starts(path: str | Path, skip: int, every: int) -> tuple[np.ndarray, int]:
    """(byte offsets of lines skip, skip + every, ... ; number of lines), streaming the file.

    A last line without a newline counts as a line.
    """
    starts: list[np.ndarray] = [np.zeros(1, np.int64)] if skip == 0 else []
    lines = 0  # newlines before the current chunk
    base = 0
    last = NEWLINE
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            ends = np.flatnonzero(np.frombuffer(chunk, np.uint8) == NEWLINE)
            following = lines + 1 + np.arange(len(ends))  # the line that starts after each newline
            keep = (following >= skip) & ((following - skip) % every == 0)
            starts.append(base + ends[keep].astype(np.int64) + 1)
            lines += len(ends)
            base += len(chunk)
            last = chunk[-1]
    total = lines + (1 if base and last != NEWLINE else 0)
    found = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    return found[found < base], total


@dataclass
class Segments:
    """Runs of lines, one row each: group, first line (0-based, headers included), line count, and
    the byte range [start, end) of the run in each file of the group (width = the widest group)."""

    group: np.ndarray
    first_line: np.ndarray
    n_lines: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __len__(self) -> int:
        return len(self.group)

    def describe(self, i: int) -> list:
        return [int(self.group[i]), int(self.first_line[i]), int(self.n_lines[i]),
                self.start[i].tolist(), self.end[i].tolist()]


def cut(groups: Sequence[LineGroup], every: int) -> Segments:
    """Every group's lines after its headers in runs of `every` lines; aligned files must agree in length."""
    width = max((len(g.files) for g in groups), default=1)
    parts = []
    for gi, group in enumerate(groups):
        cuts = [line_starts(p, group.skip, every) for p in group.files]
        totals = {n for _, n in cuts}
        if len(totals) > 1:
            counts = " but ".join(f"{p} has {n - group.skip} rows" for p, (_, n) in zip(group.files, cuts))
            raise SourceError(f"{counts}; the files are aligned row by row")
        total = totals.pop()
        count = len(cuts[0][0])
        first = group.skip + every * np.arange(count, dtype=np.int64)
        n = np.minimum(every, total - first)
        start = np.zeros((count, width), np.int64)
        end = np.zeros((count, width), np.int64)
        for fi, (offsets, _) in enumerate(cuts):
            size = Path(group.files[fi]).stat().st_size
            start[:, fi] = offsets
            end[:, fi] = np.append(offsets[1:], size)
        parts.append((np.full(count, gi, np.int32), first, n, start, end))
    if not parts:
        return Segments(*(np.zeros(0, np.int64) for _ in range(3)), np.zeros((0, width), np.int64),
                        np.zeros((0, width), np.int64))
    return Segments(*(np.concatenate([p[i] for p in parts]) for i in range(5)))


def count_lines(groups: Sequence[LineGroup]) -> int:
    """Data lines (headers left out) of all groups: what cut() will cover."""
    return sum(line_starts(g.files[0], g.skip, 1 << 62)[1] - g.skip for g in groups)


def read_run(path: str, start: int, end: int) -> list[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def segment_lines(groups: Sequence[LineGroup], segment: list) -> Iterator[tuple[int, tuple[bytes, ...]]]:
    """(1-based line number, raw line of each file of the group) for one described segment."""
    gi, first, n, starts, ends = segment
    files = groups[gi].files
    runs = [read_run(p, starts[i], ends[i]) for i, p in enumerate(files)]
    for k in range(n):
        yield first + k + 1, tuple(run[k] if k < len(run) else b"" for run in runs)


def parse_line(parser: RowParser, groups: Sequence[LineGroup], gi: int, line: int,
               raw: tuple[bytes, ...]) -> SourceRow | None:
    """Decode (a line that is not UTF-8 is a reject naming file and line) and parse one line."""
    if not any(raw):
        return None
    texts = []
    for path, data in zip(groups[gi].files, raw):
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            return SourceRow(key=f"{Path(path).name}:{line}", split="unknown", reason="bad_encoding",
                             detail=f"{path} line {line}: not UTF-8 ({err})")
    return parser.parse(gi, line, tuple(texts))


@dataclass
class SourcePlan:
    """A source as the driver plans it: line files to cut, how to parse them, what the rows mean."""

    groups: list[LineGroup]
    parser: RowParser
    class_names: list[str]  # index -> name; for identity sources, the training identities
    extra: dict = field(default_factory=dict)  # reader-specific manifest entries
    rows: int = 0  # expected rows (data lines), for progress and the final count check


def plan_rows(plan: SourcePlan, every: int = 1 << 16) -> Iterator[SourceRow]:
    """Every row of a plan, parsed here in this process (the eager readers; tests and small sets)."""
    segments = cut(plan.groups, every)
    for i in range(len(segments)):
        seg = segments.describe(i)
        for line, raw in segment_lines(plan.groups, seg):
            row = parse_line(plan.parser, plan.groups, seg[0], line, raw)
            if row is not None:
                yield row
