"""Prepare at face-recognition scale: `detector: none` for aligned sets, bad input as rejects with their
location, errors before Ray, and shard order that mixes identity-sorted inputs."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from recordio_writers import write_identity_recordio, write_sorted_recordio

from ranray import cli
from ranray.data.schema import read_manifest, shard_paths
from ranray.data.synth import SynthOptions, synthesize


def _encoded(side: int, mode: str = "RGB", fmt: str = "JPEG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 255, (side, side, channels), dtype=np.uint8).squeeze()
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, fmt)
    return buf.getvalue()


def _prepare(argv: list[str]) -> tuple[dict, dict[str, dict], dict[str, dict]]:
    """Run `ranray prepare`; (manifest, written rows by key, rejects by key)."""
    assert cli.main(["prepare", *argv, "num_workers=1"]) == 0
    out = Path(argv[argv.index("--out") + 1])
    manifest = read_manifest(out)
    rows = {r["key"]: r for s in manifest["splits"] for r in pq.read_table(shard_paths(out, s)).to_pylist()}
    rejects = {r["key"]: r for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    assert manifest["rows_in"] == len(rows) + len(rejects) == manifest["rows_written"] + manifest["rows_rejected"]
    return manifest, rows, rejects


def test_detector_none_keeps_aligned_faces_and_rejects_or_resizes_the_rest(ray_session, tmp_path):
    aligned, grey = _encoded(112, seed=1), _encoded(112, "L", seed=2)
    samples = [(0, aligned), (0, grey), (1, _encoded(100, seed=3)), (1, _encoded(112, "RGBA", "PNG", seed=4))]
    rec, _ = write_identity_recordio(tmp_path / "train", samples)
    base = ["recordio", str(rec), "detector=none"]
    manifest, rows, rejects = _prepare(base + ["--out", str(tmp_path / "strict")])
    assert manifest["detector"] == "none"
    assert rows["train.rec:1"]["image"] == aligned  # the JPEG bytes as they were: no decode-encode loss
    regrey = Image.open(io.BytesIO(rows["train.rec:2"]["image"]))
    assert regrey.mode == "RGB" and regrey.size == (112, 112) and rows["train.rec:2"]["landmarks"] == []
    assert rejects["train.rec:3"]["reason"] == "not_aligned_size" and "100x100" in rejects["train.rec:3"]["detail"]
    assert rejects["train.rec:4"]["reason"] == "bad_channels" and "RGBA" in rejects["train.rec:4"]["detail"]

    _, rows, rejects = _prepare(base + ["resize=true", "--out", str(tmp_path / "resized")])
    assert Image.open(io.BytesIO(rows["train.rec:3"]["image"])).size == (112, 112)
    assert set(rejects) == {"train.rec:4"} and rows["train.rec:3"]["label"] == 1


def test_broken_recordio_records_are_rejects_naming_file_key_and_offset(ray_session, tmp_path):
    face = _encoded(112, seed=5)
    rec, idx = write_identity_recordio(tmp_path / "train", [(k % 2, face) for k in range(6)])
    offsets = {int(k): int(o) for k, o in (line.split("\t") for line in idx.read_text().splitlines())}
    data = bytearray(rec.read_bytes())
    data[offsets[2]:offsets[2] + 4] = b"JUNK"  # record 2: garbage where its framing's magic was
    struct.pack_into("<f", data, offsets[4] + 8 + 4, float("nan"))  # record 4: its header's label is garbage
    rec.write_bytes(bytes(data[:offsets[6] + 20]))  # cut inside record 6, the last image: a truncated download
    idx.write_text(idx.read_text().replace(f"5\t{offsets[5]}\n", f"5\t{len(data) + 1000}\n"))  # past the end
    _, rows, rejects = _prepare(["recordio", str(rec), "detector=none", "--out", str(tmp_path / "out")])
    assert set(rows) == {"train.rec:1", "train.rec:3"}
    for key in ("train.rec:2", "train.rec:4", "train.rec:5", "train.rec:6"):
        assert rejects[key]["reason"] == "corrupt_image", rejects[key]
        assert str(rec) in rejects[key]["detail"] and f"key {key.split(':')[1]}" in rejects[key]["detail"]
    assert "bad magic" in rejects["train.rec:2"]["detail"] and "not a number" in rejects["train.rec:4"]["detail"]
    assert "past the end" in rejects["train.rec:5"]["detail"] and "truncated" in rejects["train.rec:6"]["detail"]
    assert f"at byte {offsets[2]}" in rejects["train.rec:2"]["detail"]


def test_empty_files_and_non_utf8_lines_are_rejects_with_their_location(ray_session, tmp_path):
    folder = synthesize(tmp_path / "folder", SynthOptions(n=6, seed=6, format="imagefolder")).root
    empty = next((folder / "train").glob("*/*.png")).with_name("empty.png")
    empty.write_bytes(b"")
    _, _, rejects = _prepare(["imagefolder", str(folder), "--out", str(tmp_path / "f")])
    key = str(empty.relative_to(folder))
    assert rejects[key]["reason"] == "empty_file" and str(empty) in rejects[key]["detail"]

    raw = synthesize(tmp_path / "fer", SynthOptions(n=10, seed=7, non_face_frac=0.0)).root
    new = raw / "fer2013new.csv"
    lines = new.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"Training", b"Tr\xe4ining").replace(b"PublicTest", b"Publ\xefcTest")
    new.write_bytes(b"\n".join(lines))
    _, rows, rejects = _prepare(["ferplus", str(raw), "--out", str(tmp_path / "p")])
    assert rejects["fer2013new.csv:4"]["reason"] == "bad_encoding"
    assert f"{new} line 4: not UTF-8" in rejects["fer2013new.csv:4"]["detail"]
    assert len(rows) == 9


def test_missing_index_and_unwritable_output_stop_before_any_work(tmp_path, capsys):
    rec, idx = write_identity_recordio(tmp_path / "train", [(0, _encoded(112))])
    idx.unlink()
    assert cli.main(["prepare", "recordio", str(rec), "--out", str(tmp_path / "out")]) == 2
    assert f"RecordIO index not found: {idx}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.rec"]

    write_identity_recordio(tmp_path / "train", [(0, _encoded(112))])
    (tmp_path / "file").write_text("not a folder")
    assert cli.main(["prepare", "recordio", str(rec), "--out", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert "config key 'out'" in err and "cannot be written" in err and str(tmp_path / "file") in err


def test_identity_sorted_recordio_gives_row_groups_of_many_identities(ray_session, tmp_path):
    faces = [_encoded(112, seed=s) for s in range(4)]
    counts = [50] * 60  # 3,000 images sorted by identity, as face2rec writes them
    rec, _ = write_sorted_recordio(tmp_path / "train", counts, lambda i, j: faces[(i + j) % 4])
    out = tmp_path / "out"
    manifest, _, _ = _prepare(["recordio", str(rec), "detector=none", "rows_per_shard=512", "--out", str(out)])
    assert manifest["rows_written"] == 3000 and manifest["splits"]["train"]["identities"] == 60
    labels = [r["label"] for r in pq.read_table(shard_paths(out, "train"), columns=["label"]).to_pylist()]
    assert sorted(labels) == sorted(i for i, n in enumerate(counts) for _ in range(n))  # none lost, none twice
    per_group = []
    for path in shard_paths(out, "train"):
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            group = pf.read_row_group(g, columns=["label"]).column("label").to_numpy()
            per_group.append((len(group), len(np.unique(group))))
    # Sorted input would give 1 or 2 identities per row group of this size; each block's runs come from
    # all over the file, so even the poorest group holds many.
    assert min(ids for _, ids in per_group) >= 12 and all(rows <= 64 for rows, _ in per_group), per_group
