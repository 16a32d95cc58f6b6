"""Dataset readers: FERPlus label modes and row alignment, RAF-DB, AffectNet, folders, RecordIO, subset flags.

No Ray and no dlib here: readers run in the driver before Ray starts.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from recordio_writers import RecordIOWriter, pack, write_identity_recordio
from source_readers import (read_affectnet, read_ferplus, read_identity, read_imagefolder, read_rafdb, read_recordio,
                            read_source)

from ranray.config import CLASS_NAMES, PrepareConfig
from ranray.data.schema import FLAG_OCCLUSION, FLAG_POSE30
from ranray.data.sources import SourceError, mark_subsets
from ranray.data.sources.common import IMAGE_RECORD
from ranray.data.sources.ferplus_labels import VOTE_COLUMNS, ferplus_target
from ranray.data.sources.recordio import IRHeader

N, H, SU, SA, AN, DI, FE, CO, UNK, NF = range(10)


def votes(**counts: int) -> list[int]:
    index = {name: i for i, name in enumerate(CLASS_NAMES)} | {"unknown": UNK, "nf": NF}
    v = [0] * 10
    for name, n in counts.items():
        v[index[name]] = n
    return v


# ---------------------------------------------------------------------------------------------
# FERPlus label modes on hand-made vote rows
# ---------------------------------------------------------------------------------------------


def test_majority_clear_winner_is_one_hot():
    target, reason = ferplus_target(votes(happiness=7, neutral=3), "majority")
    assert reason == "" and target == [0.0, 1.0, 0, 0, 0, 0, 0, 0]


def test_single_votes_are_zeroed_before_the_majority_rule():
    # 5 of 10 is no majority, but after the four single votes are dropped it is 5 of 6.
    target, reason = ferplus_target(votes(surprise=5, neutral=1, fear=1, anger=1, sadness=1, contempt=1), "majority")
    assert reason == "" and target[SU] == 1.0


def test_majority_tie_has_no_consensus():
    assert ferplus_target(votes(happiness=4, surprise=4, neutral=2), "majority") == ([], "label_no_consensus")


def test_majority_exactly_half_is_not_enough():
    assert ferplus_target(votes(anger=5, disgust=5), "majority")[1] == "label_no_consensus"


def test_unknown_and_nf_majorities_are_rejected():
    assert ferplus_target(votes(unknown=8, happiness=2), "majority") == ([], "label_unknown")
    assert ferplus_target(votes(nf=9, unknown=1), "majority") == ([], "label_not_face")
    assert ferplus_target(votes(nf=6, neutral=4), "probability") == ([], "label_not_face")


def test_all_single_votes_leave_nothing():
    ten_singles = [1] * 10
    for mode in ("majority", "probability", "multi_target"):
        assert ferplus_target(ten_singles, mode) == ([], "label_no_consensus")


def test_probability_takes_top_classes_up_to_75_percent():
    target, reason = ferplus_target(votes(happiness=5, surprise=3, neutral=2), "probability")
    # 5 (50%) < 75%: take surprise too (80%); stop. Neutral's 2 votes stay out.
    assert reason == "" and target[H] == pytest.approx(5 / 8) and target[SU] == pytest.approx(3 / 8)
    assert target[N] == 0.0
    assert ferplus_target(votes(happiness=5, surprise=3, neutral=2), "crossentropy")[0] == target


def test_probability_tie_takes_both_classes():
    target, reason = ferplus_target(votes(sadness=4, neutral=4, fear=2), "probability")
    assert reason == "" and target[SA] == target[N] == pytest.approx(0.5)


def test_probability_drops_unknown_tied_after_an_emotion():
    # Happiness 4 then unknown 3 and sadness 3 tie; the authors' loop stops at unknown and drops it.
    target, reason = ferplus_target(votes(happiness=4, sadness=3, unknown=3), "probability")
    assert reason == "" and target[H] == pytest.approx(4 / 7) and target[SA] == pytest.approx(3 / 7)


def test_multi_target_keeps_classes_with_30_percent():
    target, reason = ferplus_target(votes(anger=4, disgust=4, contempt=2), "multi_target")
    assert reason == "" and target[AN] == target[DI] == pytest.approx(0.5) and target[CO] == 0.0
    # Single sadness vote dropped: 9 votes; only anger (3) reaches 30%, and 3 is not over half.
    assert ferplus_target(votes(anger=3, disgust=2, contempt=2, fear=2, sadness=1), "multi_target")[1] == \
        "label_no_consensus"


# ---------------------------------------------------------------------------------------------
# FERPlus reader
# ---------------------------------------------------------------------------------------------

PIXELS = " ".join(["128"] * 2304)


def write_ferplus(folder: Path, rows: list[tuple[str, str, list[int]]], drop: str = "") -> Path:
    """rows: (Usage, Image name, 10 votes); drop: a column left out of fer2013new.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "fer2013.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        for usage, _, _ in rows:
            w.writerow([0, PIXELS, usage])
    with (folder / "fer2013new.csv").open("w", newline="") as f:
        w = csv.writer(f)
        header = ["Usage", "Image name", *VOTE_COLUMNS]
        keep = [i for i, h in enumerate(header) if h != drop]
        w.writerow([header[i] for i in keep])
        for usage, name, v in rows:
            full = [usage, name, *v]
            w.writerow([full[i] for i in keep])
    return folder


def test_ferplus_reader_splits_modes_and_rejects(tmp_path):
    folder = write_ferplus(tmp_path / "fp", [
        ("Training", "fer0000000.png", votes(happiness=6, surprise=4)),
        ("PublicTest", "fer0000001.png", votes(happiness=6, surprise=4)),
        ("PrivateTest", "", votes(nf=10)),
        ("Training", "fer0000003.png", votes(unknown=7, anger=3)),
        ("PrivateTest", "fer0000004.png", votes(fear=4, surprise=4, sadness=2)),
    ])
    rows = read_ferplus([str(folder)], "probability").rows
    assert [r.split for r in rows] == ["train", "val", "test", "train", "test"]
    assert rows[0].target[H] == pytest.approx(0.6) and rows[0].target[SU] == pytest.approx(0.4)  # probability
    assert rows[1].target[H] == 1.0 and rows[1].target[SU] == 0.0  # val: always majority
    assert rows[0].votes == votes(happiness=6, surprise=4) and rows[0].pixels == PIXELS
    assert (rows[2].reason, rows[3].reason, rows[4].reason) == ("not_face_row", "label_unknown", "label_no_consensus")
    assert "fer2013new.csv line 4" in rows[2].detail


def test_ferplus_missing_column_names_the_file(tmp_path):
    folder = write_ferplus(tmp_path / "fp", [("Training", "fer0000000.png", votes(happiness=10))], drop="contempt")
    with pytest.raises(SourceError, match=r"fer2013new\.csv: missing column\(s\) \['contempt'\]"):
        read_ferplus([str(folder)])


def test_ferplus_files_out_of_step_are_an_error(tmp_path):
    folder = write_ferplus(tmp_path / "fp", [("Training", "a.png", votes(happiness=10)),
                                             ("PublicTest", "b.png", votes(happiness=10))])
    lines = (folder / "fer2013.csv").read_text().splitlines()
    (folder / "fer2013.csv").write_text("\n".join(lines[:1] + lines[2:] + lines[1:2]) + "\n")  # reorder
    with pytest.raises(SourceError, match="line 2 has Usage 'PublicTest'.*not aligned row by row"):
        read_ferplus([str(folder)])
    (folder / "fer2013.csv").write_text("\n".join(lines[:2]) + "\n")  # one row short
    with pytest.raises(SourceError, match="has 1 rows but .* has 2"):
        read_ferplus([str(folder / "fer2013new.csv"), str(folder / "fer2013.csv")])


def test_ferplus_bad_votes_row_is_a_reject(tmp_path):
    folder = write_ferplus(tmp_path / "fp", [("Training", "a.png", votes(happiness=10))])
    text = (folder / "fer2013new.csv").read_text().replace("a.png,0,10", "a.png,0,ten")
    (folder / "fer2013new.csv").write_text(text)
    (row,) = read_ferplus([str(folder)]).rows
    assert row.reason == "bad_votes" and "line 2" in row.detail


# ---------------------------------------------------------------------------------------------
# RAF-DB, AffectNet, folders
# ---------------------------------------------------------------------------------------------


def test_rafdb_is_seven_way_in_its_own_label_order(tmp_path):
    root = tmp_path / "basic"
    (root / "EmoLabel").mkdir(parents=True)
    (root / "Image" / "aligned").mkdir(parents=True)
    lines = [f"train_{i:05d}.jpg {code}" for i, code in enumerate(range(1, 8), start=1)]
    lines += ["test_0001.jpg 9", "val_0001.jpg 1"]
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    read = read_rafdb([str(root)], "given")
    rows = read.rows
    assert read.class_names == ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"]
    assert [r.label for r in rows[:7]] == list(range(7))  # RAF-DB's own 7-way order
    assert rows[3].target == [0, 0, 0, 1.0, 0, 0, 0]
    assert rows[0].path.endswith("Image/aligned/train_00001_aligned.jpg") and rows[0].split == "train"
    assert (rows[7].reason, rows[8].reason) == ("bad_label", "bad_split")


def write_affectnet(folder: Path, rows: list[list[str]]) -> Path:
    (folder / "Manually_Annotated_Images").mkdir(parents=True, exist_ok=True)
    path = folder / "validation.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                    "facial_landmarks", "expression", "valence", "arousal"])
        w.writerows(rows)
    return path


def test_affectnet_box_landmarks_and_excluded_classes(tmp_path):
    marks = ";".join(str(float(v)) for v in range(136))
    path = write_affectnet(tmp_path / "an", [
        ["1/a.jpg", "10", "20", "100", "110", marks, "2", "0.1", "0.2"],
        ["1/b.jpg", "10", "20", "100", "110", marks, "8", "0", "0"],
        ["1/c.jpg", "10", "20", "100", "110", marks, "10", "0", "0"],
        ["1/d.jpg", "10", "20", "100", "110", "1;2", "7", "0", "0"],
    ])
    read = read_affectnet([str(path)])
    rows = read.rows
    assert read.class_names == ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt"]
    assert read.class_names[rows[0].label] == "sadness" and rows[0].label == 2 and rows[0].split == "val"
    assert rows[0].box == [10.0, 20.0, 110.0, 130.0] and len(rows[0].landmarks) == 136
    assert (rows[1].reason, rows[2].reason) == ("label_none", "label_no_face")
    assert read.class_names[rows[3].label] == "contempt" and rows[3].landmarks == []  # malformed: ignored
    seven = read_affectnet([str(path)], num_classes=7)
    assert len(seven.class_names) == 7 and "contempt" not in seven.class_names
    assert seven.rows[3].reason == "label_contempt" and seven.rows[0].target == [0, 0, 1.0, 0, 0, 0, 0]


def test_affectnet_missing_column_names_the_file(tmp_path):
    path = write_affectnet(tmp_path / "an", [])
    path.write_text("subDirectory_filePath,face_x,expression\n1/a.jpg,1,2\n")
    with pytest.raises(SourceError, match=r"validation\.csv: missing column"):
        read_source(PrepareConfig(source="affectnet", inputs=[str(path)], out="x"))


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (90, 90, 90)).save(path)


def test_imagefolder_splits_synonyms_and_unknown_class(tmp_path):
    for rel in ("train/happy/a.png", "train/Neutral/b.png", "test/fearful/c.png"):
        _png(tmp_path / "f" / rel)
    rows = read_imagefolder([str(tmp_path / "f")]).rows
    assert {(r.key, r.split, CLASS_NAMES[r.label]) for r in rows} == {
        ("train/happy/a.png", "train", "happiness"), ("train/Neutral/b.png", "train", "neutral"),
        ("test/fearful/c.png", "test", "fear")}
    _png(tmp_path / "f" / "train" / "joyful" / "d.png")
    with pytest.raises(SourceError, match="joyful.*is not an expression class"):
        read_imagefolder([str(tmp_path / "f")])



def test_imagefolder_without_class_folders_says_what_it_expected_and_found(tmp_path):
    for name in ("a.png", "b.png", "c.jpg"):
        _png(tmp_path / "flat" / name)
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "hollow" / "happy").mkdir(parents=True)
    (tmp_path / "split" / "train").mkdir(parents=True)
    expected = r"expected DIR/<class>/<images> or DIR/\{train,val,test\}/<class>/<images>, class folders named .*happy"
    for folder, found in (("flat", r"found 3 images directly in \S*flat and no class folders"),
                          ("empty", r"\S*empty is empty"), ("split", r"\S*split/train is empty"),
                          ("hollow", r"the class folders under \S*hollow hold no images \(\.jpg")):
        with pytest.raises(SourceError, match=f"^imagefolder: {found}.*; {expected}"):
            read_imagefolder([str(tmp_path / folder)])


def test_prepare_cli_stops_on_a_flat_image_folder_in_one_line(tmp_path, capsys):
    from ranray import cli

    for i in range(3):
        _png(tmp_path / "flat" / f"{i}.jpg")
    assert cli.main(["prepare", "imagefolder", str(tmp_path / "flat"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("ranray prepare: imagefolder: found 3 images directly in ") and "class folders named" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat"]  # no output and no work folder left

def test_identity_labels_are_per_split(tmp_path):
    for rel in ("train/bob/1.png", "train/bob/2.png", "train/amy/1.png", "val/zed/1.png"):
        _png(tmp_path / "ids" / rel)
    (tmp_path / "ids" / "pairs.txt").write_text("val/zed/1.png val/zed/1.png 1\n")
    read = read_identity([str(tmp_path / "ids")])
    labels = {r.key: r.label for r in read.rows}
    assert labels == {"train/amy/1.png": 0, "train/bob/1.png": 1, "train/bob/2.png": 1, "val/zed/1.png": 0}
    assert read.class_names == ["amy", "bob"] and read.extra["pairs_files"]


def test_subset_lists_set_flags_by_key_or_file_name(tmp_path):
    for rel in ("train/happy/a.png", "train/happy/b.png"):
        _png(tmp_path / "f" / rel)
    rows = read_imagefolder([str(tmp_path / "f")]).rows
    (tmp_path / "occ.txt").write_text("a.png\nnot-there.png\n")
    (tmp_path / "pose.txt").write_text("train/happy/b.png\n")
    report = mark_subsets(rows, {"occlusion": str(tmp_path / "occ.txt"), "pose30": str(tmp_path / "pose.txt")})
    assert {r.key: r.flags for r in rows} == {"train/happy/a.png": FLAG_OCCLUSION, "train/happy/b.png": FLAG_POSE30}
    assert report["occlusion"] == {"listed": 2, "matched": 1, "unmatched": 1, "unmatched_examples": ["not-there"]}
    with pytest.raises(SourceError, match="subset list not found"):
        mark_subsets(rows, {"pose45": str(tmp_path / "nope.txt")})


def test_recordio_rows_come_from_headers_with_offsets(tmp_path):
    (tmp_path / "ms1m").mkdir()
    write_identity_recordio(tmp_path / "ms1m" / "train", [(2, b"c"), (0, b"a1"), (1, b"b"), (0, b"a2")])
    with RecordIOWriter(tmp_path / "extra.rec", tmp_path / "extra.idx") as w:  # no identity header
        for key, label in ((5, 1.0), (9, -1.0), (11, np.array([0.0, 7.0]))):
            w.write_idx(key, pack(IRHeader(0, label), b"image-%d" % key))
    with (tmp_path / "extra.idx").open("a") as idx:
        idx.write("12\t999999\n")  # past the end of extra.rec
    read = read_source(PrepareConfig(source="recordio", inputs=[str(tmp_path / "ms1m"),
                                                                        str(tmp_path / "extra.rec")], out="x"))
    rows = {r.key: r for r in read.rows}
    assert {k: r.label for k, r in rows.items() if not r.reason} == {
        "train.rec:1": 0, "train.rec:2": 0, "train.rec:3": 1, "train.rec:4": 2, "extra.rec:5": 4, "extra.rec:11": 3}
    assert rows["extra.rec:9"].reason == "bad_label" and "identity -1" in rows["extra.rec:9"].detail
    assert rows["extra.rec:12"].reason == "corrupt_image" and "past the end" in rows["extra.rec:12"].detail
    assert read.class_names == ["id0", "id1", "id2", "id3", "id4"]
    assert read.extra == {"identities": {"train": 5}, "records": 8}
    extra = (tmp_path / "extra.rec").read_bytes()
    row = rows["extra.rec:5"]
    assert row.image_kind == IMAGE_RECORD and row.split == "train" and row.path == str(tmp_path / "extra.rec")
    assert extra[row.offset + 8 + 24:].startswith(b"image-5")  # the offset, not the image, travels


def test_recordio_without_its_index_is_an_error_naming_the_file(tmp_path):
    rec, idx = write_identity_recordio(tmp_path / "train", [(0, b"a")])
    idx.unlink()
    with pytest.raises(SourceError, match=re.escape(f"RecordIO index not found: {idx}")):
        read_recordio([str(rec)])
    with pytest.raises(SourceError, match="RecordIO file not found"):
        read_recordio([str(tmp_path / "nope.rec")])
    (tmp_path / "other").mkdir()
    write_identity_recordio(tmp_path / "other" / "train", [(0, b"a")])
    with pytest.raises(SourceError, match="named \\['train.rec'\\]"):
        read_recordio([str(tmp_path / "other" / "train.rec"), str(tmp_path / "other")])
