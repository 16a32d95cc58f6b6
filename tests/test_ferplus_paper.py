"""The RAN paper's data: the FERPlus authors' label.csv folders, RAN's subset list formats, unique keys."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from source_readers import read_ferplus

from ranray.config import ConfigError, PrepareConfig, load_config
from ranray.data.prepare import align_template, prepare
from ranray.data.schema import FLAG_OCCLUSION, FLAG_POSE30, FLAG_POSE45, SYNTH_MARKER, read_manifest
from ranray.data.sources import SourceError, mark_subsets
from ranray.data.sources.ferplus_folders import FOLDER_SPLITS
from ranray.data.sources.subsets import canonical, load_list
from ranray.model_card import describe_training_data

# name, box, votes (neutral happiness surprise sadness anger disgust fear contempt unknown NF), PNG size
MAJ_H = [0, 8, 0, 0, 0, 0, 0, 0, 2, 0]  # happiness
MAJ_S = [1, 0, 7, 0, 0, 0, 0, 0, 1, 1]  # surprise (single votes dropped)
TIE = [0, 4, 4, 0, 0, 0, 0, 0, 2, 0]  # no majority: kept by crossentropy, dropped by majority
UNK = [0, 2, 0, 0, 0, 0, 0, 0, 8, 0]
ROWS = {
    "FER2013Train": [("fer0000000.png", "(0, 0, 48, 48)", MAJ_H, 48), ("fer0000001.png", "(0, 0, 48, 48)", TIE, 48),
                     ("fer0000002.png", "(0, 0, 48, 48)", UNK, 48), ("fer0000003.png", "(0, 0, 48)", MAJ_H, 48),
                     ("fer0000004.png", "(0, 0, 48, 48)", MAJ_S, 40), ("fer0000005.png", "(2, 3, 44, 44)", MAJ_S, 48)],
    "FER2013Valid": [("fer0028638.png", "(0, 0, 48, 48)", MAJ_S, 48), ("fer0028639.png", "(0, 0, 48, 48)", TIE, 48)],
    "FER2013Test": [("fer0032220.png", "(0, 0, 48, 48)", MAJ_H, 48), ("fer0032221.png", "(0, 0, 48, 48)", MAJ_S, 48),
                    ("fer0032222.png", "(0, 0, 48, 48)", MAJ_H, None)],  # None: the PNG is missing
}

TRUNCATED, NINE_VOTES = "fer0032223.png", "fer0032224.png"
# reason, then what the detail names: the label.csv line (and the PNG when the PNG is at fault)
DAMAGED = {TRUNCATED: ("corrupt_image", ["FER2013Test/label.csv line 4", f"FER2013Test/{TRUNCATED}: OSError"]),
           NINE_VOTES: ("bad_row", ["FER2013Test/label.csv line 5: 11 fields, expected name, box and 10 votes"])}


def write_folders(root: Path) -> Path:
    """The layout microsoft/FERPlus generate_training_data.py writes: <split folder>/<name>.png + label.csv."""
    for folder, rows in ROWS.items():
        (root / folder).mkdir(parents=True)
        with (root / folder / "label.csv").open("w", newline="") as f:
            w = csv.writer(f)
            for name, box, v, side in rows:
                w.writerow([name, box, *v])
                if side:
                    Image.new("L", (side, side), 128).save(root / folder / name)
        if folder == "FER2013Train":
            with (root / folder / "label.csv").open("a") as f:
                f.write('fer0000006.png,"(0, 0, 48, 48)",1,x,0,0,0,0,0,0,0,0\n')  # a vote that is no number
    _damage(root / "FER2013Test")
    return root


def _damage(folder: Path) -> None:
    """Line 4: a PNG cut short inside its pixel data; line 5: a row with 9 votes (its PNG is fine)."""
    noise = np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)  # noise: the PNG stays large
    Image.fromarray(noise, "L").save(folder / TRUNCATED)
    data = (folder / TRUNCATED).read_bytes()
    (folder / TRUNCATED).write_bytes(data[: len(data) * 2 // 3])
    Image.new("L", (48, 48), 128).save(folder / NINE_VOTES)
    with (folder / "label.csv").open("a", newline="") as f:
        csv.writer(f).writerows([[TRUNCATED, "(0, 0, 48, 48)", *MAJ_H], [NINE_VOTES, "(0, 0, 48, 48)", *MAJ_H[:9]]])


def test_label_csv_folders_follow_the_authors_rules(tmp_path):
    read = read_ferplus([str(write_folders(tmp_path / "data"))])
    kept = {r.key: r for r in read.rows if not r.reason}
    reasons = {r.key: r.reason for r in read.rows if r.reason}
    assert read.extra["label_source"] == "label.csv"
    assert {k: (kept[k].split, kept[k].label) for k in kept} == {
        "fer0000000.png": ("train", 1), "fer0000005.png": ("train", 2), "fer0028638.png": ("val", 2),
        "fer0032220.png": ("test", 1), "fer0032221.png": ("test", 2)}
    assert reasons == {"fer0000001.png": "label_no_consensus", "fer0000002.png": "label_unknown",
                       "fer0000003.png": "bad_box", "fer0000004.png": "bad_image_size",
                       "fer0000006.png": "bad_votes", "fer0028639.png": "label_no_consensus",
                       "fer0032222.png": "image_missing", TRUNCATED: "corrupt_image", NINE_VOTES: "bad_row"}
    assert kept["fer0000005.png"].box == [2.0, 3.0, 46.0, 47.0]  # (x, y, w, h) -> x0, y0, x1, y1
    assert kept["fer0000005.png"].path.endswith("FER2013Train/fer0000005.png")
    bad_box = next(r for r in read.rows if r.key == "fer0000003.png")
    assert "label.csv line 4" in bad_box.detail and "(x, y, w, h)" in bad_box.detail
    for row in (r for r in read.rows if r.key in DAMAGED):
        assert all(part in row.detail for part in DAMAGED[row.key][1]), row.detail
    # Validation and test rows stay majority whatever the training mode.
    soft = {r.key: r for r in read_ferplus([str(tmp_path / "data")], "crossentropy").rows if not r.reason}
    assert "fer0000001.png" in soft and "fer0028639.png" not in soft


def test_a_missing_split_folder_is_a_clear_error(tmp_path):
    write_folders(tmp_path / "data")
    (tmp_path / "data" / "FER2013Valid" / "label.csv").unlink()
    with pytest.raises(SourceError, match=r"not \['FER2013Valid'\]"):
        read_ferplus([str(tmp_path / "data")])


def test_prepare_from_label_csv_records_the_label_source(ray_session, tmp_path):
    data = write_folders(tmp_path / "data")
    cfg = load_config(PrepareConfig, None, [f"inputs=[{data}]", f"out={tmp_path / 'out'}", "source=ferplus",
                                            "detector=given", "num_workers=1"])
    prepare(cfg)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["reader"]["label_source"] == "label.csv"
    assert manifest["align_template"] == "fer2013"  # auto, for the ferplus source
    assert describe_training_data(tmp_path / "out")["align_template"] == "fer2013"
    assert manifest["reader"]["label_files"] == {
        f"{folder}/label.csv": hashlib.sha256((data / folder / "label.csv").read_bytes()).hexdigest()
        for folder in FOLDER_SPLITS}
    assert manifest["rows_in"] == sum(len(r) for r in ROWS.values()) + 1 + len(DAMAGED)
    assert manifest["rows_in"] == manifest["rows_written"] + manifest["rows_rejected"]
    assert {s: manifest["splits"][s]["rows"] for s in ("train", "val", "test")} == {"train": 2, "val": 1, "test": 2}
    assert manifest["rejects_by_reason"] == {"label_no_consensus": 2, "label_unknown": 1, "bad_box": 1,
                                             "bad_image_size": 1, "bad_votes": 1, "image_missing": 1,
                                             "corrupt_image": 1, "bad_row": 1}
    rejects = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()}
    for name, (reason, parts) in DAMAGED.items():
        assert (rejects[name]["reason"], rejects[name]["split"]) == (reason, "test")
        assert all(part in rejects[name]["detail"] for part in parts), rejects[name]["detail"]


@pytest.mark.parametrize("source, setting, synthetic, template", [
    ("ferplus", "auto", False, "fer2013"), ("ferplus", "auto", True, "insightface"),
    ("rafdb", "auto", False, "insightface"), ("ferplus", "insightface", False, "insightface"),
    ("affectnet", "fer2013", False, "fer2013")])
def test_the_alignment_template_resolves_per_source(tmp_path, source, setting, synthetic, template):
    """auto: FER2013's own frame for FER2013's crops; ranray's synthetic faces keep insightface's."""
    if synthetic:
        (tmp_path / SYNTH_MARKER).write_text("{}")
    for inputs in (f"[{tmp_path}]", f"[{tmp_path / 'fer2013.csv'},{tmp_path / 'fer2013new.csv'}]"):
        cfg = load_config(PrepareConfig, None, [f"source={source}", f"inputs={inputs}", "out=y",
                                                f"align_template={setting}"])
        assert align_template(cfg) == template, inputs
    with pytest.raises(ConfigError, match="align_template"):
        load_config(PrepareConfig, None, ["inputs=[x]", "out=y", "align_template=arcface"])


# ---------------------------------------------------------------------------------------------
# RAN's subset lists, as published
# ---------------------------------------------------------------------------------------------


def test_canonical_names_of_every_published_format():
    assert [canonical(n) for n in ("0/fer0000001", "1_fer0034656.png", "0/fer0032226.jpg", "test_0003_aligned",
                                   "fer0034656.png", "train_00001.jpg", "FER2013Test/fer0032226.png")] == \
        ["fer0000001", "fer0034656", "fer0032226", "test_0003", "fer0034656", "train_00001", "fer0032226"]


def test_subset_lists_in_the_published_formats_mark_the_right_rows(tmp_path):
    read = read_ferplus([str(write_folders(tmp_path / "data"))])
    lists = {"occlusion": "1_fer0000000.png 8 0\n1_fer0032221.png 2 0\n",
             "pose30": "0/fer0028638.jpg\n0/fer9999999.jpg\n",
             "pose45": "0/fer0032220 1\n"}
    paths = {}
    for subset, text in lists.items():
        paths[subset] = str(tmp_path / f"{subset}.txt")
        Path(paths[subset]).write_text(text)
    report = mark_subsets(read.rows, paths)
    flags = {r.key: r.flags for r in read.rows if r.flags}
    assert flags == {"fer0000000.png": FLAG_OCCLUSION, "fer0032221.png": FLAG_OCCLUSION,
                     "fer0028638.png": FLAG_POSE30, "fer0032220.png": FLAG_POSE45}
    assert report["pose30"] == {"listed": 2, "matched": 1, "unmatched": 1, "unmatched_examples": ["fer9999999"]}
    rafdb = tmp_path / "raf.txt"
    rafdb.write_text("test_0003_aligned 3 4\n")
    assert load_list(str(rafdb)) == {"test_0003"}


def test_a_list_line_in_no_known_format_names_file_and_line(tmp_path):
    bad = tmp_path / "occ.txt"
    bad.write_text("fer0000001.png 3\nfer0000002.png happy yes\n")
    with pytest.raises(SourceError, match=r"occ.txt line 2: 'fer0000002.png happy yes' is in none of the known"):
        load_list(str(bad))


def test_repeated_names_in_fer2013new_get_unique_keys(tmp_path):
    pixels = " ".join(["128"] * 48 * 48)
    with (tmp_path / "fer2013.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        for usage in ("Training", "Training", "PublicTest"):
            w.writerow([3, pixels, usage])
    with (tmp_path / "fer2013new.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                    "contempt", "unknown", "NF"])
        for usage, name in (("Training", "fer0006953.png"), ("Training", "fer0006954.png"),
                            ("PublicTest", "fer0006953.png")):
            w.writerow([usage, name, *MAJ_H])
    read = read_ferplus([str(tmp_path)])
    assert [r.key for r in read.rows] == ["fer0006953.png", "fer0006954.png", "fer0006953.png@4"]
    assert read.extra["label_source"] == "fer2013new.csv" and read.extra["repeated_names"] == 1
    assert read.extra["label_files"] == {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
                                         for name in ("fer2013.csv", "fer2013new.csv")}
