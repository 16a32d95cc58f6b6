"""`ranray prepare` end to end on the shared local Ray: counts add up, shards read back, rejects explain."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from recordio_writers import write_identity_recordio

from ranray import cli
from ranray.config import CLASS_NAMES, ConfigError
from ranray.data.prepare import check_output
from ranray.data.schema import FACE_SIZE, FLAG_OCCLUSION, REJECT_SCHEMA, SHARD_SCHEMA, read_manifest, shard_paths
from ranray.data.synth import SynthOptions, synthesize


def _corrupt_pixels(root: Path, bad: list[str]) -> list[str]:
    """Give the first face rows of fer2013.csv the `bad` pixel strings; returns those rows' keys."""
    names = [r[1] for r in csv.reader((root / "fer2013new.csv").open())]
    lines = [i for i, name in enumerate(names) if i and name][:len(bad)]
    rows = list(csv.reader((root / "fer2013.csv").open()))
    for line, pixels in zip(lines, bad):
        rows[line][1] = pixels
    with (root / "fer2013.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return [names[line] for line in lines]


def _read_split(out: Path, split: str):
    return pq.read_table(shard_paths(out, split)).to_pylist()


def test_synthetic_ferplus_through_ranray_prepare(ray_session, tmp_path, capsys):
    raw = synthesize(tmp_path / "raw", SynthOptions(n=48, seed=11, non_face_frac=0.05, occlusion_frac=0.25))
    short, letters = _corrupt_pixels(raw.root, [" ".join(["7"] * 2303), "x " * 2304])
    out = tmp_path / "prepared"
    argv = ["prepare", "ferplus", str(raw.root), "--out", str(out), "num_workers=2",
            "rows_per_shard=16", f"subset_lists.occlusion={raw.subset_lists['occlusion']}"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("prepared ferplus") and "48 rows in" in printed[-1]
    progress = [line for line in printed if line.startswith("prepare: ")]
    assert progress and "rows/s, ETA" in progress[-1] and "/48 rows (100%)" in progress[-1]

    manifest = read_manifest(out)
    assert manifest["rows_in"] == 48 == manifest["rows_written"] + manifest["rows_rejected"]
    rejects = pq.read_table(out / "rejects.parquet")
    assert rejects.schema.equals(REJECT_SCHEMA) and rejects.num_rows == manifest["rows_rejected"]
    by_key = {r["key"]: r for r in rejects.to_pylist()}
    assert by_key[short]["reason"] == "bad_pixels" and "2303 pixel values" in by_key[short]["detail"]
    assert by_key[letters]["reason"] == "bad_pixels"
    assert sum(r["reason"] == "not_face_row" for r in by_key.values()) == 2
    assert all(r["reason"] and r["detail"] for r in by_key.values())
    assert manifest["rejects_by_reason"]["bad_pixels"] == 2

    occluded = set(Path(raw.subset_lists["occlusion"]).read_text().split())
    written = 0
    for split, info in manifest["splits"].items():
        rows = _read_split(out, split)
        assert pq.read_schema(shard_paths(out, split)[0]).equals(SHARD_SCHEMA)
        assert len(rows) == info["rows"] and info["shards"] == len(shard_paths(out, split))
        assert sum(info["per_class"]) == len(rows) and len(info["per_class"]) == len(CLASS_NAMES)
        for r in rows:
            img = Image.open(io.BytesIO(r["image"]))
            assert img.size == (FACE_SIZE, FACE_SIZE) and img.mode == "RGB"
            assert len(r["landmarks"]) == 136 and len(r["votes"]) == 10 and sum(r["votes"]) == 10
            assert r["split"] == split and r["target"][r["label"]] == max(r["target"])
            assert bool(r["flags"] & FLAG_OCCLUSION) == (r["key"] in occluded)
        written += len(rows)
    assert written == manifest["rows_written"]
    assert not list(tmp_path.glob(".prepared.*"))  # the temp dir was renamed, nothing left behind

    # Same output again: refused before any work, with the reason.
    assert cli.main(argv) == 2
    assert "already exists" in capsys.readouterr().err


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_imagefolder_corrupt_files_are_rejects_and_overwrite_replaces(ray_session, tmp_path, capsys):
    raw = synthesize(tmp_path / "raw", SynthOptions(n=8, seed=2, format="imagefolder"))
    for folder in ("anger", "fear"):
        (raw.root / "train" / folder).mkdir(exist_ok=True)
    _truncated_jpeg(raw.root / "train" / "anger" / "truncated.jpg")
    (raw.root / "train" / "fear" / "not-an-image.jpg").write_text("hello")
    out = tmp_path / "out"
    argv = ["prepare", "imagefolder", str(raw.root), "--out", str(out), "detector=given", "num_workers=1"]
    assert cli.main(argv) == 0
    manifest = read_manifest(out)
    assert manifest["rows_in"] == 10 and manifest["rows_written"] == 8
    reasons = {r["key"]: (r["reason"], r["detail"]) for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    assert reasons["train/anger/truncated.jpg"][0] == "corrupt_image"
    assert "truncated.jpg" in reasons["train/anger/truncated.jpg"][1]
    assert reasons["train/fear/not-an-image.jpg"][0] == "corrupt_image"

    (raw.root / "train" / "fear" / "not-an-image.jpg").unlink()
    assert cli.main(argv + ["--overwrite"]) == 0
    assert read_manifest(out)["rows_in"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no temp or old dirs left


def test_missing_column_is_an_error_naming_the_file_before_ray(tmp_path, capsys):
    raw = synthesize(tmp_path / "raw", SynthOptions(n=4, seed=1))
    new = raw.root / "fer2013new.csv"
    rows = list(csv.reader(new.open()))
    with new.open("w", newline="") as f:
        csv.writer(f).writerows([r[:-1] for r in rows])  # drop the NF column
    assert cli.main(["prepare", "ferplus", str(raw.root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "fer2013new.csv: missing column(s) ['NF']" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_never_replaces_a_folder_that_is_not_a_prepared_dataset(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not a prepared dataset"):
        check_output(tmp_path / "home", overwrite=True)
    check_output(tmp_path / "empty", overwrite=False)  # absent is fine
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps({}))
    with pytest.raises(ConfigError, match="already exists"):
        check_output(tmp_path / "ds", overwrite=False)
    check_output(tmp_path / "ds", overwrite=True)


def test_identity_folder_keeps_pairs_and_identity_names(ray_session, tmp_path):
    raw = synthesize(tmp_path / "raw", SynthOptions(n=16, seed=3, format="identity", per_identity=4, pairs=6))
    out = tmp_path / "ids"
    assert cli.main(["prepare", "identity", str(raw.root), "--out", str(out), "num_workers=1"]) == 0
    manifest = read_manifest(out)
    assert manifest["num_classes"] == 2 and manifest["class_names"] == []  # train identities; names in a file
    assert (out / "identities.txt").read_text().split() == ["id00000", "id00001"]
    assert manifest["splits"]["train"]["identities"] == 2 and manifest["splits"]["val"]["rows"] == 8
    assert (out / "pairs.txt").read_text() == (raw.root / "pairs.txt").read_text()
    val_keys = {r["key"] for r in _read_split(out, "val")}
    pairs = [line.split() for line in (out / "pairs.txt").read_text().splitlines()]
    assert all(a in val_keys and b in val_keys for a, b, _ in pairs)


def _identity_recordio(tmp_path: Path) -> tuple[Path, dict[str, int], str]:
    """A face2rec-style train.rec of synthetic faces (every identity folder, as JPEG) plus one record
    with valid framing and garbage image bytes; returns the .rec, {key: identity} and the bad key."""
    raw = synthesize(tmp_path / "raw", SynthOptions(n=12, seed=4, format="identity", per_identity=3, pairs=2))
    folders = sorted((p for p in raw.root.glob("*/*") if p.is_dir()), key=lambda p: p.name)
    samples = []
    for identity, folder in enumerate(folders):
        for png in sorted(folder.iterdir()):
            buf = io.BytesIO()
            Image.open(png).convert("RGB").save(buf, "JPEG", quality=95)
            samples.append((identity, buf.getvalue()))
    samples.append((len(folders) - 1, b"\xff\xd8 not really a jpeg"))  # sorts last: the last image key
    rec, _ = write_identity_recordio(tmp_path / "train", samples)
    labels = {f"train.rec:{key}": identity for key, (identity, _) in enumerate(samples, 1)}
    return rec, labels, f"train.rec:{len(samples)}"


def test_recordio_prepares_identities_and_rejects_a_corrupt_record(ray_session, tmp_path):
    rec, labels, bad = _identity_recordio(tmp_path)
    out = tmp_path / "ms1m"
    assert cli.main(["prepare", "recordio", str(rec), "--out", str(out), "detector=given", "num_workers=1"]) == 0
    manifest = read_manifest(out)
    assert manifest["rows_in"] == len(labels) == manifest["rows_written"] + manifest["rows_rejected"]
    assert manifest["rows_rejected"] == 1 and list(manifest["splits"]) == ["train"]
    assert manifest["num_classes"] == 4 and manifest["reader"] == {"identities": {"train": 4}, "records": 13}
    (reject,) = pq.read_table(out / "rejects.parquet").to_pylist()
    assert reject["key"] == bad and reject["reason"] == "corrupt_image"
    assert str(rec) in reject["detail"] and bad in reject["detail"]
    rows = _read_split(out, "train")
    assert {r["key"]: r["label"] for r in rows} == {k: v for k, v in labels.items() if k != bad}
    for r in rows:
        assert Image.open(io.BytesIO(r["image"])).size == (FACE_SIZE, FACE_SIZE) == (112, 112)
        assert len(r["landmarks"]) == 136 and r["source"] == "recordio"
    assert (out / "identities.txt").read_text().split() == ["id0", "id1", "id2", "id3"]


def test_align_fallback_switch_reaches_the_aligner(tmp_path):
    from ranray.config import PrepareConfig, load_config
    from ranray.data.prepare import align_options

    base = [f"inputs=[{tmp_path}]", f"out={tmp_path / 'out'}", "source=imagefolder"]
    assert align_options(load_config(PrepareConfig, overrides=base)).fallback is True
    strict = load_config(PrepareConfig, overrides=base + ["align_fallback=false"])
    assert strict.align_fallback is False and align_options(strict).fallback is False
    with pytest.raises(ConfigError, match="align_fallback"):
        load_config(PrepareConfig, overrides=base + ["align_fallback=maybe"])
