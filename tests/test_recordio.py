"""insightface-style RecordIO: framing, IRHeader packing, identity header, writer/reader round trip."""

from __future__ import annotations

import io
import pickle
import struct

import numpy as np
import pytest
from PIL import Image
from recordio_writers import RecordIOWriter, pack, write_identity_recordio, write_record

from ranray.data.sources.recordio import (IR_SIZE, MAGIC, IRHeader, RecordIOError, RecordIOReader, read_record,
                                          read_record_at, record_label, unpack)


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_framing_is_dmlc_byte_layout():
    f = io.BytesIO()
    write_record(f, b"abcde")
    raw = f.getvalue()
    assert raw[:4] == struct.pack("<I", MAGIC) and struct.unpack("<I", raw[4:8])[0] == 5
    assert raw[8:] == b"abcde\0\0\0"  # padded to 4 bytes


def test_payload_containing_the_magic_is_split_and_rejoined():
    magic = struct.pack("<I", MAGIC)
    payload = b"head" + magic + b"middle!!" + magic + b"tail-x"
    f = io.BytesIO()
    write_record(f, payload)
    write_record(f, b"next")
    raw = f.getvalue()
    flags = [struct.unpack("<I", raw[i + 4:i + 8])[0] >> 29 for i in range(0, len(raw), 4)
             if raw[i:i + 4] == magic]
    assert flags == [1, 2, 3, 0]  # first, middle, last part; then a whole record
    f.seek(0)
    assert read_record(f) == payload and read_record(f) == b"next" and read_record(f) is None


def test_sized_read_stops_early_and_rejoins_split_heads():
    magic = struct.pack("<I", MAGIC)
    payload = b"head" + magic + b"middle!!" + magic + b"tail-x"
    f = io.BytesIO()
    write_record(f, b"first")
    second = f.tell()
    write_record(f, payload)
    assert read_record_at(f, second, 2) == b"he" and f.tell() == second + 8 + 2  # the rest stays unread
    assert read_record_at(f, second, 6) == b"head" + magic  # the magic between parts is put back
    assert read_record_at(f, second, 14) == payload[:14]
    assert read_record_at(f, second, 999) == payload == read_record_at(f, second)
    with pytest.raises(RecordIOError, match="past the end"):
        read_record_at(f, len(f.getvalue()))


def test_irheader_scalar_and_array_labels():
    header, body = unpack(pack(IRHeader(0, 7.0, 3, 0), b"img"))
    assert (header.flag, header.label, header.id, body) == (0, 7.0, 3, b"img")
    header, body = unpack(pack(IRHeader(0, np.array([2.0, 5.0, 9.0])), b"img"))
    assert header.flag == 3 and header.label.tolist() == [2.0, 5.0, 9.0] and body == b"img"
    assert len(pack(IRHeader(0, 1.0), b"")) == IR_SIZE == 24


def test_identity_dataset_round_trip(tmp_path):
    samples = [(label, _jpeg(i)) for i, label in enumerate([2, 0, 1, 0, 2, 2, 1])]
    rec, idx = write_identity_recordio(tmp_path / "train", samples)
    reader = RecordIOReader(rec, idx)
    assert reader.header0 == (8, 11) and reader.num_identities == 3 and len(reader) == 7
    got = list(reader)
    assert [s.label for s in got] == [0, 0, 1, 1, 2, 2, 2]
    expected = sorted(samples, key=lambda s: s[0])
    assert [s.image for s in got] == [image for _, image in expected]
    assert [reader.identity_range(i) for i in range(3)] == [(1, 3), (3, 5), (5, 8)]
    decoded = Image.open(io.BytesIO(got[0].image))
    assert decoded.size == (112, 112) and decoded.mode == "RGB"


def test_labels_come_from_headers_alone(tmp_path):
    rec, idx = write_identity_recordio(tmp_path / "train", [(1, _jpeg(0)), (0, _jpeg(1)), (1, _jpeg(2))])
    reader = RecordIOReader(rec, idx)
    assert [reader.label(k) for k in reader.image_keys] == [s.label for s in reader] == [0, 1, 1]
    assert record_label(pack(IRHeader(0, np.array([4.0, 9.0])), b"")) == 4
    with pytest.raises(RecordIOError, match="not a number"):
        record_label(pack(IRHeader(0, float("nan")), b""))
    with pytest.raises(RecordIOError, match="shorter than"):
        record_label(b"\0" * 10)


def test_reader_pickles_for_ray_workers(tmp_path):
    rec, idx = write_identity_recordio(tmp_path / "train", [(0, _jpeg(0)), (1, _jpeg(1))])
    reader = RecordIOReader(rec, idx)
    reader.read(1)  # opens the file; the pickled copy must reopen its own
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read(2).image == reader.read(2).image


def test_plain_indexed_file_without_identity_header(tmp_path):
    with RecordIOWriter(tmp_path / "x.rec", tmp_path / "x.idx") as w:
        for key in (5, 9):
            w.write_idx(key, pack(IRHeader(0, float(key % 4)), b"payload-%d" % key))
    reader = RecordIOReader(tmp_path / "x.rec")  # .idx found beside the .rec
    assert reader.header0 is None and reader.image_keys == [5, 9]
    assert [(s.key, s.label, s.image) for s in reader] == [(5, 1, b"payload-5"), (9, 1, b"payload-9")]


def test_corrupt_files_give_clear_errors(tmp_path):
    rec, idx = write_identity_recordio(tmp_path / "train", [(0, _jpeg(0))])
    data = bytearray(rec.read_bytes())
    data[0] ^= 0xFF
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match="bad magic"):
        RecordIOReader(rec, idx)
    rec.write_bytes(b"")
    with pytest.raises(RecordIOError, match="past the end"):
        RecordIOReader(rec, idx)
    with pytest.raises(RecordIOError, match="not in"):
        RecordIOReader(*write_identity_recordio(tmp_path / "ok", [(0, _jpeg(0))])).read(99)
