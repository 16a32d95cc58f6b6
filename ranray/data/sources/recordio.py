"""insightface-style MXNet RecordIO (`train.rec` + `train.idx`), read without mxnet (the tests'
writer of the same format: tests/recordio_writers.py).

Framing (dmlc-core recordio): every record part is a little-endian uint32 magic 0xced7230a, a
uint32 `lrec` whose top 3 bits are a continuation flag and low 29 bits the part length, the
bytes, then zero padding to a 4-byte boundary. A payload that contains the magic at a 4-byte
aligned offset is split there (flags 1 = first, 2 = middle, 3 = last; 0 = whole record) and the
reader puts the magic back between parts. `train.idx` is text: "<key>\t<byte offset>\n".

Payload (mxnet.recordio.pack): struct 'IfQQ' header (flag, label, id, id2), 24 bytes; when
flag > 0 the label is an array of `flag` float32 values placed right after the header (and the
scalar label field is 0); then the image (JPEG) bytes.

Face-recognition sets (insightface's face2rec / MXFaceDataset): record 0 is a header whose label
array is [a, b]: images are records 1 .. a-1 (label = identity), and records a .. b-1 are one
per identity with label [first image, end image). Without such a header every key is an image.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
IR_FORMAT = "<IfQQ"  # little-endian, no padding: 24 bytes, as mxnet's native 'IfQQ' on x86/arm
IR_SIZE = struct.calcsize(IR_FORMAT)


class RecordIOError(ValueError):
    """A .rec / .idx pair is malformed (bad magic, truncated record, missing key)."""


@dataclass(frozen=True)
class IRHeader:
    flag: int
    label: float | np.ndarray  # a float, or a float32 array when flag > 0
    id: int = 0
    id2: int = 0


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    if len(record) < IR_SIZE:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than its {IR_SIZE}-byte header")
    flag, label, id1, id2 = struct.unpack(IR_FORMAT, record[:IR_SIZE])
    body = record[IR_SIZE:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(f"record header announces {flag} float labels but has {len(body)} bytes")
        return IRHeader(flag, np.frombuffer(body, "<f4", flag).copy(), id1, id2), body[4 * flag:]
    return IRHeader(flag, label, id1, id2), body


# ---------------------------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------------------------


def _next_part(f: BinaryIO) -> tuple[int, int] | None:
    """(continuation flag, length) of the part at f's position, or None at the end of the file."""
    head = f.read(8)
    if not head:
        return None
    if len(head) < 8:
        raise RecordIOError(f"truncated record header at byte {f.tell() - len(head)}")
    magic, lrec = struct.unpack("<II", head)
    if magic != MAGIC:
        raise RecordIOError(f"bad magic 0x{magic:08x} at byte {f.tell() - 8} (not a RecordIO file?)")
    return lrec >> 29, lrec & _LEN_MASK


def read_record(f: BinaryIO, size: int | None = None) -> bytes | None:
    """The next record's payload, or None at the end of the file.

    size: read only the first `size` payload bytes (all, when the record is shorter) and leave the
    file mid-record, so that a header read does not pull the image off the disk.
    """
    parts: list[bytes] = []
    have = 0  # payload bytes so far, with the magic that joins each part to the one before
    while True:
        part = _next_part(f)
        if part is None:
            if parts:
                raise RecordIOError(f"truncated record at byte {f.tell()}: its last part is missing")
            return None
        cflag, length = part
        have += 4 if parts else 0
        take = length if size is None else max(0, min(length, size - have))
        data = f.read(take + (-length % 4 if take == length else 0))[:take]
        if len(data) < take:
            raise RecordIOError(f"truncated record at byte {f.tell()}: wanted {length} bytes")
        parts.append(data)
        have += take
        if cflag in (0, 3) or (size is not None and have >= size):
            return _MAGIC_BYTES.join(parts)


def read_record_at(f: BinaryIO, offset: int, size: int | None = None) -> bytes:
    """The record starting at byte `offset` (a train.idx offset); see read_record for `size`."""
    f.seek(offset)
    record = read_record(f, size)
    if record is None:
        raise RecordIOError(f"offset {offset} is past the end of {getattr(f, 'name', 'the file')}")
    return record


LABEL_BYTES = IR_SIZE + 4  # a record's header and its first array label: all record_label needs


def record_label(record: bytes) -> int:
    """The identity in a record's header: its scalar label, or the first value of its label array."""
    if len(record) < IR_SIZE:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than its {IR_SIZE}-byte header")
    flag, label = struct.unpack_from("<If", record)
    if flag > 0:
        if len(record) < LABEL_BYTES:
            raise RecordIOError(f"record header announces {flag} float labels but has none")
        (label,) = struct.unpack_from("<f", record, IR_SIZE)
    if not np.isfinite(label):
        raise RecordIOError(f"record label {label} is not a number")
    return int(label)


# ---------------------------------------------------------------------------------------------
# Indexed files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordIOSample:
    key: int  # the record key in train.idx
    label: int  # identity (the first label value when the label is an array)
    image: bytes  # encoded image (JPEG)


class RecordIOReader:
    """Random access to a .rec/.idx pair. The file opens lazily per process, so a reader can be
    pickled into Ray tasks and actors."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        self.offsets = self._read_index(self.idx_path)
        self._file: BinaryIO | None = None
        self._pid = -1
        self.header0 = self._identity_header()

    @staticmethod
    def _read_index(path: Path) -> dict[int, int]:
        if not path.is_file():
            raise RecordIOError(f"index file not found: {path}")
        offsets: dict[int, int] = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    key, pos = line.split("\t")
                    offsets[int(key)] = int(pos)
                except ValueError as err:
                    raise RecordIOError(f"{path}:{n}: expected '<key>\\t<offset>', got {line!r}") from err
        return offsets

    def _identity_header(self) -> tuple[int, int] | None:
        if 0 not in self.offsets:
            return None
        header, _ = unpack(self.read_idx(0))
        return (int(header.label[0]), int(header.label[1])) if header.flag > 0 else None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": -1}

    @property
    def keys(self) -> list[int]:
        return sorted(self.offsets)

    @property
    def image_keys(self) -> list[int]:
        """Keys of image records (insightface: 1 .. header0[0]-1 when record 0 is a header)."""
        if self.header0 is None:
            return self.keys
        return list(range(1, self.header0[0]))

    @property
    def num_identities(self) -> int | None:
        return None if self.header0 is None else self.header0[1] - self.header0[0]

    def identity_range(self, identity: int) -> tuple[int, int]:
        """[first, end) image keys of an identity, from its identity record."""
        if self.header0 is None:
            raise RecordIOError(f"{self.rec_path} has no identity header (record 0)")
        header, _ = unpack(self.read_idx(self.header0[0] + identity))
        return int(header.label[0]), int(header.label[1])

    def read_idx(self, key: int, size: int | None = None) -> bytes:
        """Record `key`'s payload (its first `size` bytes when given: see read_record)."""
        if key not in self.offsets:
            raise RecordIOError(f"key {key} is not in {self.idx_path}")
        try:
            return read_record_at(self._handle(), self.offsets[key], size)
        except RecordIOError as err:
            raise RecordIOError(f"key {key}: {err}") from None

    def read(self, key: int) -> RecordIOSample:
        record = self.read_idx(key)
        return RecordIOSample(key, record_label(record), unpack(record)[1])

    def label(self, key: int) -> int:
        """Record `key`'s identity, from its header alone (the image bytes stay on disk)."""
        return record_label(self.read_idx(key, LABEL_BYTES))

    def __len__(self) -> int:
        return len(self.image_keys)

    def __iter__(self) -> Iterator[RecordIOSample]:
        return (self.read(k) for k in self.image_keys)

    def _handle(self) -> BinaryIO:
        # One handle per process: a handle inherited through fork would share its file offset.
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.rec_path, "rb"), os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
