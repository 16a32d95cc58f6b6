"""insightface-style RecordIO files written without mxnet, for tests and benchmarks (ranray only reads
them: ranray.data.sources.recordio, whose docstring describes the format). The framing is dmlc's
RecordIOWriter byte for byte, the payload mxnet.recordio.pack's, the layout insightface's face2rec.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np

from ranray.data.sources.recordio import IR_FORMAT, MAGIC, IRHeader, RecordIOError

_MAGIC_BYTES = struct.pack("<I", MAGIC)


def pack(header: IRHeader, payload: bytes) -> bytes:
    """mxnet.recordio.pack: scalar labels force flag 0; array labels set flag to their length."""
    if isinstance(header.label, (int, float, np.floating, np.integer)):
        return struct.pack(IR_FORMAT, 0, float(header.label), header.id, header.id2) + payload
    label = np.asarray(header.label, dtype="<f4").ravel()
    return struct.pack(IR_FORMAT, label.size, 0.0, header.id, header.id2) + label.tobytes() + payload


def _write_part(f: BinaryIO, cflag: int, data: bytes) -> None:
    f.write(_MAGIC_BYTES + struct.pack("<I", (cflag << 29) | len(data)) + data)


def write_record(f: BinaryIO, payload: bytes) -> None:
    """dmlc RecordIOWriter::WriteRecord, byte for byte."""
    if len(payload) >= 1 << 29:
        raise RecordIOError("RecordIO records must be shorter than 2^29 bytes")
    start = 0
    for i in range(0, len(payload) - len(payload) % 4, 4):
        if payload[i:i + 4] == _MAGIC_BYTES:
            _write_part(f, 1 if start == 0 else 2, payload[start:i])
            start = i + 4
    _write_part(f, 3 if start else 0, payload[start:])
    f.write(b"\0" * (-len(payload) % 4))


class RecordIOWriter:
    """MXIndexedRecordIO(idx, rec, 'w'): `write_idx(key, payload)` appends and indexes a record."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
        self._rec = open(rec_path, "wb")
        self._idx = open(idx_path, "w")

    def write_idx(self, key: int, payload: bytes) -> None:
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        write_record(self._rec, payload)

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_identity_recordio(prefix: str | os.PathLike, samples: Sequence[tuple[int, bytes]]) -> tuple[Path, Path]:
    """Write `prefix.rec` / `prefix.idx` the way insightface's face2rec lays out a face set.

    samples: (identity, encoded image) pairs; identities must be 0..K-1. Images are grouped by
    identity (stable), record 0 is the [first identity record, end) header, and one record per
    identity holds its [first image, end image) keys.
    """
    ordered = sorted(samples, key=lambda s: s[0])
    identities = sorted({label for label, _ in ordered})
    if identities != list(range(len(identities))):
        raise ValueError("identities must be 0..K-1 with no gaps")
    prefix = Path(prefix)
    rec, idx = prefix.with_suffix(".rec"), prefix.with_suffix(".idx")
    first_id_key = len(ordered) + 1
    ranges = _identity_ranges([label for label, _ in ordered])
    with RecordIOWriter(rec, idx) as w:
        w.write_idx(0, pack(IRHeader(2, np.array([first_id_key, first_id_key + len(ranges)], "f4")), b""))
        for key, (label, image) in enumerate(ordered, 1):
            w.write_idx(key, pack(IRHeader(0, float(label), key, 0), image))
        for i, (start, end) in enumerate(ranges):
            w.write_idx(first_id_key + i, pack(IRHeader(2, np.array([start, end], "f4")), b""))
    return rec, idx


def _identity_ranges(sorted_labels: list[int]) -> list[tuple[int, int]]:
    """[first, end) image keys (1-based records) per identity of grouped labels."""
    ranges: list[tuple[int, int]] = []
    for key, label in enumerate(sorted_labels, 1):
        if label == len(ranges):
            ranges.append((key, key + 1))
        else:
            ranges[-1] = (ranges[-1][0], key + 1)
    return ranges


def write_sorted_recordio(prefix: str | os.PathLike, counts: Sequence[int],
                          image: Callable[[int, int], bytes]) -> tuple[Path, Path]:
    """face2rec's layout, streamed (nothing kept per image): identity i has counts[i] images, the j-th
    of which is image(i, j). For benchmarks and tests at scale; write_identity_recordio for given samples."""
    prefix = Path(prefix)
    rec, idx = prefix.with_suffix(".rec"), prefix.with_suffix(".idx")
    total = int(sum(counts))
    first_id_key = total + 1
    with RecordIOWriter(rec, idx) as w:
        w.write_idx(0, pack(IRHeader(2, np.array([first_id_key, first_id_key + len(counts)], "f4")), b""))
        key = 1
        for identity, count in enumerate(counts):
            for j in range(count):
                w.write_idx(key, pack(IRHeader(0, float(identity), key, 0), image(identity, j)))
                key += 1
        start = 1
        for i, count in enumerate(counts):
            w.write_idx(first_id_key + i, pack(IRHeader(2, np.array([start, start + count], "f4")), b""))
            start += count
    return rec, idx
