"""Expressions through a video file: every N-th frame's faces detected, aligned and classified by
the per-image pipeline (ranray.prediction), one id per face while it stays in view
(ranray.face_tracks), one CSV row per processed frame and face, and optionally the video again
with boxes, ids and labels drawn.

Decoding and encoding are PyAV's (FFmpeg bundled in its wheel: it reads what FFmpeg reads and
writes H.264, which OpenCV's wheel cannot; bench/video.py and the pin in pyproject.toml). Bad
input raises VideoError with one line naming the file: missing, empty, not a video, damaged or
truncated, no video stream, a codec FFmpeg cannot decode.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ranray.face_tracks import FaceTracker
from ranray.inference import TrainedModel
from ranray.prediction import ANNOTATION_COLOUR, annotation_pen, classify_faces, detect_faces, draw_label, face_aligner

FIXED_COLUMNS = ("time_s", "frame", "track_id", "left", "top", "right", "bottom", "label")
# The annotated video's encoder by its file suffix (FFmpeg picks the container from the suffix).
# What `ranray predict` reads as a video (anything else as a photograph); PyAV opens many more.
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mkv", ".mov", ".avi", ".webm", ".mpg", ".mpeg", ".wmv", ".flv",
                            ".ts", ".3gp", ".ogv"})
ENCODERS = {".mp4": "libx264", ".mkv": "libx264", ".mov": "libx264", ".avi": "libx264", ".webm": "libvpx-vp9"}
MP4_FAMILY = b"ftyp"  # bytes 4..8 of an MP4/MOV file: then an unreadable file is a damaged one


class VideoError(ValueError):
    """A video that cannot be read or written; the message is one line naming the file."""


@dataclass
class FaceRow:
    time_s: float
    frame: int
    track_id: int
    box: tuple[float, float, float, float]
    label: str
    probabilities: dict[str, float]


@dataclass
class VideoReport:
    video: str
    csv: str
    frames_read: int = 0
    frames_processed: int = 0
    faces: int = 0  # CSV rows
    tracks: int = 0  # distinct face ids
    seconds: float = 0.0  # end to end: decode, detect, align + classify, write
    stage_seconds: dict[str, float] = field(default_factory=dict)  # decode, detect, classify, annotate
    annotated: str | None = None

    @property
    def frames_per_s(self) -> float:
        return self.frames_read / self.seconds if self.seconds else 0.0

    @property
    def no_face(self) -> bool:
        return self.faces == 0

    def summary(self) -> str:
        found = (f"{self.faces} faces in {self.tracks} tracks" if self.faces
                 else f"no face found in any of {self.frames_processed} processed frames")
        return (f"{self.video}: {self.frames_read} frames read, {self.frames_processed} processed, {found}; "
                f"{self.seconds:.1f} s, {self.frames_per_s:.1f} frames/s "
                f"({self.frames_processed / max(self.seconds, 1e-9):.1f} processed frames/s) on CPU")


def predict_video(trained: TrainedModel, path: str | Path, csv_path: str | Path, every: int = 1,
                  annotated: str | Path | None = None, detector: str = "hog",
                  forget_after: int = 5) -> VideoReport:
    """Classify the faces of every `every`-th frame (0, N, 2N, ...) into `csv_path` (header always);
    with `annotated`, also write every frame with the latest processed frame's boxes drawn, at the
    input's rate. A track ends after `forget_after` processed frames without its face."""

    if every < 1:
        raise ValueError(f"every must be at least 1 frame, got {every}")
    if annotated is not None:
        encoder_for(Path(annotated))  # a wrong suffix fails before any work
    path = Path(path)
    aligner = face_aligner(trained)
    tracker = FaceTracker(forget_after=forget_after)
    report = VideoReport(str(path), str(csv_path), annotated=str(annotated) if annotated else None)
    stages = dict.fromkeys(("decode", "detect", "classify", "annotate"), 0.0)
    start = time.perf_counter()
    with ExitStack() as stack:
        container = stack.enter_context(open_video(path))
        stream = container.streams.video[0]
        writer = csv.writer(stack.enter_context(Path(csv_path).open("w", newline="")))
        writer.writerow([*FIXED_COLUMNS, *trained.class_names])
        sink = stack.enter_context(AnnotatedVideo(annotated, stream)) if annotated else None
        rows: list[FaceRow] = []
        for index, time_s, image in timed(decoded_frames(container, stream, path), stages, "decode"):
            report.frames_read += 1
            if index % every == 0:
                rows = classify_frame(trained, aligner, tracker, image, index, time_s, detector, stages)
                report.frames_processed += 1
                report.faces += len(rows)
                writer.writerows(csv_row(r, trained.class_names) for r in rows)
            if sink is not None:
                t = time.perf_counter()
                sink.write(image, rows)
                stages["annotate"] += time.perf_counter() - t
    report.tracks = tracker.next_id
    report.seconds = time.perf_counter() - start
    report.stage_seconds = {k: round(v, 3) for k, v in stages.items()}
    return report


def open_video(path: Path) -> Any:
    """The PyAV container of `path`, checked down to a decodable video stream (PyAV crashes on
    decoding a stream whose codec FFmpeg does not know, so that is caught here)."""
    import av

    if not path.exists():
        raise VideoError(f"{path}: no such file")
    if path.is_dir():
        raise VideoError(f"{path} is a directory, not a video")
    if path.stat().st_size == 0:
        raise VideoError(f"{path} is empty (0 bytes), not a video")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise VideoError(unreadable(path, exc)) from exc
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        container.close()
        raise VideoError(f"{path} has no video stream (it holds {', '.join(kinds)})")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        container.close()
        raise VideoError(f"{path}: its video codec is one FFmpeg (PyAV {av.__version__}) cannot decode")
    stream.thread_type = "AUTO"
    return container


def unreadable(path: Path, exc: Exception) -> str:
    with path.open("rb") as f:
        head = f.read(8)
    reason = getattr(exc, "strerror", None) or exc.__class__.__name__
    if head[4:8] == MP4_FAMILY:
        return f"{path} is an MP4/MOV file that cannot be read: truncated or damaged (FFmpeg: {reason})"
    return f"{path} is not a video FFmpeg can read (FFmpeg: {reason})"


def decoded_frames(container: Any, stream: Any, path: Path) -> Iterator[tuple[int, float, np.ndarray]]:
    """(index, seconds from the stream's start, RGB array) per frame; VideoError when decoding fails."""
    import av

    rate = float(stream.average_rate or stream.guessed_rate or 25)
    origin = stream.start_time or 0
    index = 0
    try:
        for frame in container.decode(stream):
            # The timestamp, not index / rate, so variable-rate phone videos get true times.
            t = (frame.pts - origin) * float(stream.time_base) if frame.pts is not None else index / rate
            yield index, round(t, 4), frame.to_ndarray(format="rgb24")
            index += 1
    except av.error.FFmpegError as exc:
        raise VideoError(f"{path} is damaged or truncated: decoding stopped after {index} frames "
                         f"(FFmpeg: {getattr(exc, 'strerror', None) or exc})") from exc


def timed(frames: Iterator[Any], stages: dict[str, float], stage: str) -> Iterator[Any]:
    while True:
        t = time.perf_counter()
        item = next(frames, None)
        stages[stage] += time.perf_counter() - t
        if item is None:
            return
        yield item


def classify_frame(trained: TrainedModel, aligner: Any, tracker: FaceTracker, image: np.ndarray, index: int,
                   time_s: float, detector: str, stages: dict[str, float]) -> list[FaceRow]:
    """Detect, align and classify one frame's faces (prediction's pipeline), ids from the tracker.
    A box dlib found but the landmark fit refused is not a face to report."""
    t = time.perf_counter()
    pil = Image.fromarray(image)
    boxes = detect_faces(np.asarray(pil.convert("L")), detector)
    stages["detect"] += time.perf_counter() - t
    t = time.perf_counter()
    faces = classify_faces(trained, aligner, pil, boxes)
    stages["classify"] += time.perf_counter() - t
    ids = tracker.update(faces.boxes)
    return [FaceRow(time_s, index, i, box, r.label, r.probabilities) for i, box, r in zip(ids, faces.boxes, faces.results)]


def csv_row(row: FaceRow, class_names: tuple[str, ...]) -> list[Any]:
    return [row.time_s, row.frame, row.track_id, *row.box, row.label, *(row.probabilities[c] for c in class_names)]


class AnnotatedVideo:
    """The output video: frames in, boxes with `#id label p` drawn, H.264 (VP9 for .webm) at the input's rate."""

    def __init__(self, path: str | Path, source_stream: Any):
        self.path = Path(path)
        self.encoder = encoder_for(self.path)
        self.rate = source_stream.average_rate or source_stream.guessed_rate or 25
        # yuv420p needs even sides: an odd last row or column is dropped.
        self.size = (source_stream.width // 2 * 2, source_stream.height // 2 * 2)
        self.container: Any = None

    def __enter__(self) -> AnnotatedVideo:
        import av

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.path), "w")
        self.stream = self.container.add_stream(self.encoder, rate=self.rate)
        self.stream.width, self.stream.height = self.size
        self.stream.pix_fmt = "yuv420p"
        return self

    def write(self, image: np.ndarray, rows: list[FaceRow]) -> None:
        import av

        w, h = self.size
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(draw_faces(image, rows)[:h, :w]), format="rgb24")
        self.container.mux(self.stream.encode(frame))

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.container.mux(self.stream.encode())
        self.container.close()


def encoder_for(path: Path) -> str:
    try:
        return ENCODERS[path.suffix.lower()]
    except KeyError:
        raise VideoError(f"{path}: an annotated video must end in one of {', '.join(ENCODERS)}") from None


def draw_faces(image: np.ndarray, rows: list[FaceRow]) -> np.ndarray:
    """prediction.annotate's look (red box, white on red label above it) with the track id, on an array."""
    if not rows:
        return image
    out = Image.fromarray(image)
    draw, font, width = annotation_pen(out)
    for r in rows:
        draw.rectangle(list(r.box), outline=ANNOTATION_COLOUR, width=width)
        draw_label(draw, f"#{r.track_id} {r.label} {r.probabilities[r.label]:.2f}", r.box[:2], font, above=True)
    return np.asarray(out)
