"""Expressions through a video (ranray.video) with the shipped real-FERPlus model, on a clip the test
writes itself from scikit-image's photographs: the astronaut (Eileen Collins, smiling) moving a
few pixels a frame, the coffee cup (no face) for longer than a track lives, then the astronaut
again elsewhere; and each kind of bad input."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import av
import numpy as np
import pytest
from skimage import data

from ranray.cli import main
from ranray.inference import load_trained_model
from ranray.video import FIXED_COLUMNS, VideoError, predict_video

FPS = 10
W, H = 320, 240
MOVING, GAP, BACK = 10, 7, 5  # frames: astronaut moving, coffee, astronaut again
FORGET_AFTER = 5  # < GAP: the face coming back is a new track


def astronaut_frame(i: int) -> np.ndarray:
    return data.astronaut()[20:20 + H, 100 + 4 * i:100 + 4 * i + W]  # the face moves 4 px left a frame


def clip_frames() -> list[np.ndarray]:
    coffee = data.coffee()[:H, :W]
    again = data.astronaut()[:H, 60:60 + W][:, ::-1]  # mirrored: the face at another place
    return ([astronaut_frame(i) for i in range(MOVING)] + [coffee] * GAP + [again] * BACK)


def write_clip(path: Path, frames: list[np.ndarray], movflags: str = "") -> Path:
    with av.open(str(path), "w", options={"movflags": movflags} if movflags else {}) as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode())
    return path


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def trained():
    return load_trained_model()  # the shipped model


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("video") / "clip.mp4", clip_frames())


@pytest.fixture(scope="module")
def every_frame(trained, clip):
    out = clip.parent / "every1.csv"
    report = predict_video(trained, clip, out, annotated=clip.parent / "annotated.mp4", forget_after=FORGET_AFTER)
    return report, *read_csv(out)


def test_one_row_per_frame_and_face_with_ids_labels_and_times(trained, every_frame):
    report, header, rows = every_frame
    assert header == [*FIXED_COLUMNS, *trained.class_names]
    n = MOVING + GAP + BACK
    assert (report.frames_read, report.frames_processed) == (n, n)
    frames = [int(r["frame"]) for r in rows]
    assert frames == list(range(MOVING)) + list(range(MOVING + GAP, n))  # one face each, none on the coffee
    assert report.faces == len(rows) and not report.no_face
    ids = [int(r["track_id"]) for r in rows]
    assert ids == [0] * MOVING + [1] * BACK and report.tracks == 2
    assert {r["label"] for r in rows} == {"happiness"}
    for r in rows:
        assert sum(float(r[c]) for c in trained.class_names) == pytest.approx(1.0, abs=2e-3)
        assert float(r["time_s"]) == pytest.approx(int(r["frame"]) / FPS, abs=1e-6)
    lefts = [float(r["left"]) for r in rows[:MOVING]]
    assert lefts[0] - lefts[-1] == pytest.approx(4 * (MOVING - 1), abs=8)  # the box follows the face
    assert report.frames_per_s > 0 and set(report.stage_seconds) == {"decode", "detect", "classify", "annotate"}
    assert "2 tracks" in report.summary()


def test_the_annotated_video_has_every_frame_at_the_same_rate(every_frame):
    report, _, _ = every_frame
    with av.open(report.annotated) as video:
        stream = video.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in video.decode(stream)]
        assert float(stream.average_rate) == FPS
    assert len(frames) == report.frames_read
    red = lambda f: ((f[..., 0] > 200) & (f[..., 1] < 90) & (f[..., 2] < 90)).mean()  # noqa: E731
    assert red(frames[0]) > 0.01 and red(frames[MOVING + 1]) < 0.001  # boxes drawn on faces, none on the coffee


def test_every_third_frame(trained, clip, every_frame):
    out = clip.parent / "every3.csv"
    report = predict_video(trained, clip, out, every=3, forget_after=FORGET_AFTER)
    _, rows = read_csv(out)
    n = MOVING + GAP + BACK
    assert report.frames_read == n and report.frames_processed == len(range(0, n, 3))
    _, all_rows = read_csv(clip.parent / "every1.csv")
    assert rows == [r for r in all_rows if int(r["frame"]) % 3 == 0]  # the same answers on the same frames


def test_a_video_without_faces_gives_the_header_only(trained, tmp_path):
    clip = write_clip(tmp_path / "coffee.mp4", [data.coffee()[:H, :W]] * 3)
    report = predict_video(trained, clip, tmp_path / "coffee.csv")
    header, rows = read_csv(tmp_path / "coffee.csv")
    assert header == [*FIXED_COLUMNS, *trained.class_names] and rows == []
    assert report.no_face and report.frames_processed == 3
    assert "no face found in any of 3 processed frames" in report.summary()


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def unknown_codec(path: Path, frames: list[np.ndarray]) -> Path:
    mkv = write_clip(path.with_suffix(".ok.mkv"), frames)
    blob = mkv.read_bytes()
    assert blob.count(b"V_MPEG4/ISO/AVC") == 1  # Matroska names its codec by string: rename it
    path.write_bytes(blob.replace(b"V_MPEG4/ISO/AVC", b"V_XXXXX/ISO/XYZ"))
    return path


def test_bad_input_gives_one_line_each(trained, clip, tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is a text file, not a video\n")
    empty = tmp_path / "empty.mp4"
    empty.touch()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])  # the index (moov) is at the end
    streamed = write_clip(tmp_path / "faststart.mp4", clip_frames(), movflags="faststart")
    cut = tmp_path / "cut.mp4"  # index first: the frames stop half way
    cut.write_bytes(streamed.read_bytes()[: streamed.stat().st_size // 2])
    cases = {
        tmp_path / "missing.mp4": "missing.mp4: no such file",
        empty: "empty.mp4 is empty (0 bytes), not a video",
        text: "notes.mp4 is not a video FFmpeg can read (FFmpeg: Invalid data found",
        truncated: "truncated.mp4 is an MP4/MOV file that cannot be read: truncated or damaged",
        cut: "cut.mp4 is damaged or truncated: decoding stopped after",
        audio_only(tmp_path / "voice.m4a"): "voice.m4a has no video stream (it holds audio)",
        unknown_codec(tmp_path / "odd.mkv", clip_frames()[:3]): "odd.mkv: its video codec is one FFmpeg",
        tmp_path: "is a directory, not a video",
    }
    for path, message in cases.items():
        with pytest.raises(VideoError) as err:
            predict_video(trained, path, tmp_path / "out.csv")
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(VideoError, match=r"out\.gif: an annotated video must end in one of \.mp4"):
        predict_video(trained, clip, tmp_path / "out.csv", annotated=tmp_path / "out.gif")


# ---------------------------------------------------------------------------------------------
# Through `ranray predict` (the shipped model, no --model)
# ---------------------------------------------------------------------------------------------


def test_ranray_predict_a_video_writes_its_csv_and_annotated_video(clip, tmp_path, capsys):
    assert main(["predict", str(clip), "--every", "2", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"frames read, \d+ processed, \d+ faces in 2 tracks; [\d.]+ s, [\d.]+ frames/s", out), out
    header, rows = read_csv(tmp_path / "out" / f"{clip.stem}_faces.csv")
    assert {int(r["frame"]) % 2 for r in rows} == {0} and {r["label"] for r in rows} == {"happiness"}
    with av.open(str(tmp_path / "out" / f"{clip.stem}_ran.mp4")) as annotated:
        assert annotated.streams.video[0].frames == MOVING + GAP + BACK


def test_ranray_predict_bad_videos_one_line_and_exit_codes(tmp_path, capfd):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    assert main(["predict", str(text)]) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("ranray predict: ") and "notes.mp4 is not a video" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "notes_faces.csv").exists()
    empty = tmp_path / "zero.mp4"
    empty.touch()
    assert main(["predict", str(empty)]) == 2
    assert "zero.mp4 is empty (0 bytes)" in capfd.readouterr().err
    coffee = write_clip(tmp_path / "coffee.mp4", [data.coffee()[:H, :W]] * 2)
    assert main(["predict", str(coffee), "--csv", str(tmp_path / "c.csv")]) == 1  # no face: header only
    header, rows = read_csv(tmp_path / "c.csv")
    assert header[:3] == ["time_s", "frame", "track_id"] and rows == []
    assert "no face found in any of 2 processed frames" in capfd.readouterr().out
