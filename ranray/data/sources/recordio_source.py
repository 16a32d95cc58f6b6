"""The `recordio` source: insightface-style RecordIO face sets (MS1MV2, Glint360K: train.rec + train.idx).

Inputs are .rec files (or folders holding a train.rec), each with its .idx beside it. One row per
image record, split "train" (these sets have no splits), label = the record's identity, shifted by
the identities of the inputs before it. The driver reads only record headers: a row carries the
.rec path and the record's byte offset, and the Ray Data actor reads the image there
(IMAGE_RECORD). insightface's verification .bin files beside the .rec are not read.
"""

from __future__ import annotations

from pathlib import Path

from ranray.data.sources.common import IMAGE_RECORD, SourceError, SourceRead, SourceRow, require_file
from ranray.data.sources.recordio import RecordIOError, RecordIOReader

DEFAULT_NAME = "train.rec"


def read_recordio(inputs: list[str]) -> SourceRead:
    rows: list[SourceRow] = []
    identities = 0
    for rec in _rec_files(inputs):
        file_rows, count = _file_rows(_open(rec), identities)
        rows += file_rows
        identities += count
    return SourceRead(rows=rows, class_names=[f"id{n}" for n in range(identities)],
                      extra={"identities": {"train": identities}, "records": len(rows)})


def read(cfg) -> SourceRead:
    return read_recordio(cfg.inputs)


def _rec_files(inputs: list[str]) -> list[Path]:
    recs = [Path(p) / DEFAULT_NAME if Path(p).is_dir() else Path(p) for p in inputs]
    names = [rec.name for rec in recs]
    clashing = sorted({n for n in names if names.count(n) > 1})
    if clashing:  # keys are "<file name>:<record key>": inputs of one name would share keys
        raise SourceError(f"several RecordIO inputs are named {clashing}; give each its own file name")
    return recs


def _open(rec: Path) -> RecordIOReader:
    require_file(rec, "RecordIO file")
    idx = rec.with_suffix(".idx")
    if not idx.is_file():
        raise SourceError(f"RecordIO index not found: {idx} (every .rec needs its .idx beside it)")
    try:
        return RecordIOReader(rec, idx)
    except RecordIOError as err:
        raise SourceError(f"{rec}: {err}") from None


def _file_rows(reader: RecordIOReader, base: int) -> tuple[list[SourceRow], int]:
    """One .rec's rows, labels shifted by `base`, and its identity count."""
    rec = reader.rec_path
    rows = []
    for key in reader.image_keys:
        row = SourceRow(key=f"{rec.name}:{key}", split="train", image_kind=IMAGE_RECORD, path=str(rec),
                        offset=reader.offsets.get(key, -1))
        try:
            row.label = reader.label(key)
        except RecordIOError as err:
            row.reason, row.detail = "corrupt_image", f"{rec}: {err}"
        rows.append(row)
    count = reader.num_identities
    if count is None:  # no identity header: the labels themselves say how many there are
        count = 1 + max((r.label for r in rows if not r.reason), default=-1)
    for row in (r for r in rows if not r.reason):
        if 0 <= row.label < count:
            row.label += base
        else:
            row.reason, row.detail = "bad_label", f"{rec}: {row.key} has identity {row.label}, not in 0..{count - 1}"
    return rows, count
