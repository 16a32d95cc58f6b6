"""The `recordio` source: insightface-style RecordIO face sets (MS1MV2, Glint360K: train.rec + train.idx).

Inputs are .rec files (or folders holding a train.rec), each with its .idx beside it. One row per
image record, split "train" (these sets have no splits), label = the record's identity, shifted by
the identities of the inputs before it. The .idx is the line file: the driver streams it once
(counting image records; a headerless .rec also has its labels read, for the identity count) and
cuts it into runs by byte offset; a worker parses its run's lines and reads each record's header
and image at its offset (IMAGE_RECORD). A record that cannot be read (an offset past the end, a
truncated file, a garbage header) is a reject naming the file, key and offset. insightface's
verification .bin files beside the .rec are not read.

Record 0 is taken as the identity header when it is the .idx's first line (insightface's layout).
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ranray.data.sources.common import IMAGE_RECORD, SourceError, SourceRow, require_file
from ranray.data.sources.lines import CHUNK_BYTES, LineGroup, SourcePlan
from ranray.data.sources.recordio import LABEL_BYTES, RecordIOError, read_record_at, record_label, unpack

DEFAULT_NAME = "train.rec"


def plan_recordio(inputs: list[str]) -> SourcePlan:
    recs = _rec_files(inputs)
    groups, firsts, bases, counts, records = [], [], [], [], 0
    identities = 0
    for rec in recs:
        idx = _index_of(rec)
        first = _image_end(rec, idx)
        images, count = _scan_index(rec, idx, first)
        groups.append(LineGroup((str(idx),)))
        firsts.append(first)
        bases.append(identities)
        counts.append(count)
        records += images
        identities += count
    parser = RecordIOParser(tuple(map(str, recs)), tuple(firsts), tuple(bases), tuple(counts))
    return SourcePlan(groups=groups, parser=parser, class_names=[f"id{n}" for n in range(identities)],
                      rows=records, extra={"identities": {"train": identities}, "records": records})


def plan(cfg, work: Path) -> SourcePlan:
    return plan_recordio(cfg.inputs)


def _rec_files(inputs: list[str]) -> list[Path]:
    recs = [Path(p) / DEFAULT_NAME if Path(p).is_dir() else Path(p) for p in inputs]
    names = [rec.name for rec in recs]
    clashing = sorted({n for n in names if names.count(n) > 1})
    if clashing:  # keys are "<file name>:<record key>": inputs of one name would share keys
        raise SourceError(f"several RecordIO inputs are named {clashing}; give each its own file name")
    return recs


def _index_of(rec: Path) -> Path:
    require_file(rec, "RecordIO file")
    idx = rec.with_suffix(".idx")
    if not idx.is_file():
        raise SourceError(f"RecordIO index not found: {idx} (every .rec needs its .idx beside it)")
    return idx


def _index_chunks(idx: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(keys, offsets) of the .idx in chunks; a line that is not '<key>\\t<offset>' is an error."""
    try:
        reader = pacsv.open_csv(
            idx, read_options=pacsv.ReadOptions(column_names=["key", "offset"], block_size=CHUNK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter="\t"),
            convert_options=pacsv.ConvertOptions(column_types={"key": pa.int64(), "offset": pa.int64()}))
        for batch in reader:
            yield batch.column(0).to_numpy(), batch.column(1).to_numpy()
    except (pa.ArrowInvalid, StopIteration) as err:
        if "Empty CSV file" in str(err):
            return
        raise SourceError(f"{idx}: not a RecordIO index ('<key>\\t<offset>' per line): {err}") from None


def _first_line(idx: Path) -> tuple[int, int] | None:
    with idx.open("rb") as f:
        parts = f.readline().split(b"\t")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return None


def _image_end(rec: Path, idx: Path) -> int:
    """End (exclusive) of the image keys 1.. when record 0 is an identity header; 0: every key is an image."""
    first = _first_line(idx)
    if first is None or first[0] != 0:
        return 0
    with rec.open("rb") as f:
        try:
            header, _ = unpack(read_record_at(f, first[1]))
        except RecordIOError as err:
            raise SourceError(f"{rec}: its identity header (record 0) is unreadable: {err}") from None
    return int(header.label[0]) if header.flag > 0 else 0


def _scan_index(rec: Path, idx: Path, image_end: int) -> tuple[int, int]:
    """(image records, identities). The header gives the identities; without one, the labels do."""
    images, top = 0, -1
    with rec.open("rb") as f:
        for keys, offsets in _index_chunks(idx):
            if image_end:
                images += int(((keys >= 1) & (keys < image_end)).sum())
                continue
            images += len(keys)
            top = max([top] + [_label_or_none(f, int(o)) for o in offsets])
    if image_end:
        header, _ = unpack(read_record_at(open(rec, "rb"), _first_line(idx)[1]))
        return images, int(header.label[1]) - image_end
    return images, top + 1


def _label_or_none(f: BinaryIO, offset: int) -> int:
    try:
        return record_label(read_record_at(f, offset, LABEL_BYTES))
    except RecordIOError:
        return -1  # the worker rejects the row with the reason


class RecordIOParser:
    """idx line -> a row carrying the .rec path and the record's offset; the label from its header."""

    def __init__(self, recs: tuple[str, ...], image_ends: tuple[int, ...], bases: tuple[int, ...],
                 counts: tuple[int, ...]):
        self.recs, self.image_ends, self.bases, self.counts = recs, image_ends, bases, counts
        self._files: dict[int, BinaryIO] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def parse(self, group: int, line: int, texts: tuple[str, ...]) -> SourceRow | None:
        rec, end = self.recs[group], self.image_ends[group]
        key_text, _, offset_text = texts[0].partition("\t")
        key, offset = int(key_text), int(offset_text)  # the driver's index scan parsed every line
        if end and not 1 <= key < end:
            return None  # the header or an identity record
        row = SourceRow(key=f"{Path(rec).name}:{key}", split="train", image_kind=IMAGE_RECORD, path=rec,
                        offset=offset)
        try:
            label = record_label(read_record_at(self._file(group), offset, LABEL_BYTES))
        except (OSError, RecordIOError) as err:
            row.reason, row.detail = "corrupt_image", f"{rec}: key {key} at byte {offset}: {err}"
            return row
        count = self.counts[group]
        if 0 <= label < count:
            row.label = label + self.bases[group]
        else:
            row.reason, row.detail = "bad_label", f"{rec}: {row.key} has identity {label}, not in 0..{count - 1}"
        return row

    def _file(self, group: int) -> BinaryIO:
        if group not in self._files:
            self._files[group] = open(self.recs[group], "rb")
        return self._files[group]
