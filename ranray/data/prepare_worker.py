"""The worker side of `ranray prepare`: one task = one block of input rows, read, aligned and written here.

A task names its block's runs of lines (ranray.data.sources.lines). The worker parses them into
rows, loads each image, aligns it with dlib (or passes an already-aligned face through, detector
"none"), and writes the block's shards (one per split, rows in a fixed shuffled order), its rejects
and last its marker with the block's statistics (ranray.data.shards.write_task_output). Nothing
but the statistics goes back to the driver. A bad row never raises: it becomes a reject.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import BinaryIO, Callable, Iterator

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from ranray.data.align import AlignOptions, FaceAligner
from ranray.data.schema import FACE_SIZE, FLAG_ALIGN_FALLBACK, REJECT_SCHEMA, SHARD_SCHEMA, SUBSET_FLAGS
from ranray.data.shards import OutputLocation, write_task_output
from ranray.failures import redirect_stderr
from ranray.data.sources import RowReject, SourceRow
from ranray.data.sources.common import IMAGE_FILE, IMAGE_PIXELS, IMAGE_RECORD
from ranray.data.sources.lines import LineGroup, RowParser, parse_line, segment_lines
from ranray.data.sources.recordio import RecordIOError, read_record_at, unpack
from ranray.data.sources.subsets import mark_row

MIN_IMAGE_SIDE = 16  # smaller "images" hold no face worth aligning
FER_SIDE = 48  # FER2013 pixels rows are 48x48
ORDER_SEED = 0
FALLBACK_EXAMPLES = 20

# ---------------------------------------------------------------------------------------------
# Image bytes and pixels
# ---------------------------------------------------------------------------------------------


def _open(source: Path | io.BytesIO, where: str) -> Image.Image:
    """The decoded image as stored (mode and size untouched); a corrupt one is a reject."""
    try:
        img = Image.open(source)
        img.load()  # decode now: a truncated or corrupt file fails here, not later
        return img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise RowReject("corrupt_image", f"{where}: {type(err).__name__}: {err}") from None


def _file_bytes(row: dict) -> tuple[bytes, str]:
    path = Path(row["path"])
    if not path.is_file():
        raise RowReject("missing_file", str(path))
    data = path.read_bytes()
    if not data:
        raise RowReject("empty_file", f"{path}: 0 bytes")
    return data, str(path)


@functools.lru_cache(maxsize=8)
def _record_file(path: str) -> BinaryIO:
    # Kept open for the actor's life: a block reads many records of one .rec, each at its offset.
    return open(path, "rb")


def _record_bytes(row: dict) -> tuple[bytes, str]:
    where = f"{row['path']} ({row['key']}, byte {row['offset']})"
    try:
        _, image = unpack(read_record_at(_record_file(row["path"]), row["offset"]))
    except (OSError, RecordIOError) as err:
        raise RowReject("corrupt_image", f"{where}: {type(err).__name__}: {err}") from None
    if not image:
        raise RowReject("corrupt_image", f"{where}: the record holds no image bytes")
    return image, where


def _pixels(row: dict) -> Image.Image:
    values = row["pixels"].split()
    if len(values) != FER_SIDE * FER_SIDE:
        raise RowReject("bad_pixels", f"{row['key']}: {len(values)} pixel values, expected {FER_SIDE * FER_SIDE}")
    try:
        arr = np.array(values, dtype=np.float64)
    except ValueError as err:
        raise RowReject("bad_pixels", f"{row['key']}: {err}") from None
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
        raise RowReject("bad_pixels", f"{row['key']}: values outside 0..255")
    return Image.fromarray(arr.reshape(FER_SIDE, FER_SIDE).astype(np.uint8), "L")


BYTE_LOADERS: dict[str, Callable[[dict], tuple[bytes, str]]] = {IMAGE_FILE: _file_bytes, IMAGE_RECORD: _record_bytes}


def load_image(row: dict) -> tuple[Image.Image, bytes | None]:
    """(image as stored, its encoded bytes; None for FER2013 pixel rows)."""
    if row["image_kind"] == IMAGE_PIXELS:
        return _pixels(row), None
    data, where = BYTE_LOADERS[row["image_kind"]](row)
    return _open(io.BytesIO(data), where), data


def jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Faces: dlib alignment, or pass-through for aligned sets
# ---------------------------------------------------------------------------------------------


class DlibFaces:
    """Detect (or take the given box), fit 68 landmarks, similarity-warp to 112x112, JPEG."""

    def __init__(self, options: AlignOptions, quality: int, resize: bool = False):
        self.aligner = FaceAligner(options)
        self.quality = quality

    def face(self, row: dict) -> dict:
        img, _ = load_image(row)
        img = ImageOps.exif_transpose(img).convert("RGB")  # phone photos store their rotation in EXIF
        if min(img.size) < MIN_IMAGE_SIDE:
            raise RowReject("image_too_small", f"{row['key']}: {img.size[0]}x{img.size[1]}")
        box = tuple(row["box"]) if row["box"] else None
        aligned = self.aligner.align(img, box=box, hint=np.asarray(row["landmarks"]) if row["landmarks"] else None)
        return {"image": jpeg(aligned.image, self.quality), "landmarks": aligned.landmarks.reshape(-1).tolist(),
                "flags": row["flags"] | (FLAG_ALIGN_FALLBACK if aligned.fallback else 0), "detail": aligned.detail}


PASS_MODES = {"RGB", "L"}  # colour or grey faces; anything else (alpha, CMYK, palettes) is not an aligned face


class PassThroughFaces:
    """detector none: the face is already aligned. Check 112x112 and the channels; keep RGB JPEG bytes
    as they are, re-encode anything else; a face of another size is a reject, or resized if asked."""

    def __init__(self, options: AlignOptions, quality: int, resize: bool = False):
        self.quality = quality
        self.resize = resize

    def face(self, row: dict) -> dict:
        img, data = load_image(row)
        if img.mode not in PASS_MODES:
            raise RowReject("bad_channels", f"{row['key']}: mode {img.mode}, expected RGB or L")
        size = (FACE_SIZE, FACE_SIZE)
        if img.size != size and not self.resize:
            raise RowReject("not_aligned_size", f"{row['key']}: {img.size[0]}x{img.size[1]}, detector none takes "
                                                f"aligned {FACE_SIZE}x{FACE_SIZE} faces (resize=true resizes)")
        keep = data is not None and img.format == "JPEG" and img.mode == "RGB" and img.size == size
        if not keep:
            data = jpeg(img.convert("RGB").resize(size, Image.BICUBIC), self.quality)
        return {"image": data, "landmarks": [], "flags": row["flags"], "detail": ""}


FACE_MAKERS = {"hog": DlibFaces, "cnn": DlibFaces, "given": DlibFaces, "none": PassThroughFaces}


# ---------------------------------------------------------------------------------------------
# One task
# ---------------------------------------------------------------------------------------------


@dataclass
class BlockJob:
    """What every task of one prepare shares (pickled once into each actor)."""

    source: str
    groups: list[LineGroup]
    parser: RowParser
    out: OutputLocation
    options: AlignOptions
    quality: int
    resize: bool
    per_class: int  # number of classes to count per split; 0: identities (count distinct labels)
    subsets: dict[str, set[str]] = field(default_factory=dict)  # subset -> listed names


def task_rows(job: BlockJob, task: dict) -> Iterator[SourceRow | None]:
    """The rows of the task's lines [lo, hi) of its block (None for lines that hold no row)."""
    pos = 0
    for seg in task["segments"]:
        n = seg[2]
        if pos + n <= task["lo"] or pos >= task["hi"]:
            pos += n
            continue
        for line, raw in segment_lines(job.groups, seg):
            if task["lo"] <= pos < task["hi"]:
                yield _parse(job, seg[0], line, raw)
            pos += 1


def _parse(job: BlockJob, gi: int, line: int, raw: tuple[bytes, ...]) -> SourceRow | None:
    try:
        return parse_line(job.parser, job.groups, gi, line, raw)
    except Exception as err:  # noqa: BLE001 - a line no parser understands is a reject, not a dead worker
        where = job.groups[gi].files[0]
        return SourceRow(key=f"{PurePath(where).name}:{line}", split="unknown", reason="unparsable_line",
                         detail=f"{where} line {line}: {type(err).__name__}: {err}")


def reject_record(row: SourceRow | dict, source: str, reason: str, detail: str) -> dict:
    get = row.get if isinstance(row, dict) else lambda k: getattr(row, k)
    return {"key": get("key"), "source": source, "split": get("split"), "reason": reason, "detail": detail}


def process_row(maker, row: dict, source: str) -> tuple[dict | None, dict | None]:
    """(shard row, None) or (None, reject record); never raises for a bad row."""
    try:
        face = maker.face(row)
    except RowReject as rej:
        return None, reject_record(row, source, rej.reason, rej.detail)
    except Exception as err:  # noqa: BLE001 - a bad row must never kill the actor
        return None, reject_record(row, source, "error", f"{type(err).__name__}: {err}")
    out = {"key": row["key"], "label": row["label"], "target": row["target"], "votes": row["votes"],
           "split": row["split"], "source": source, **face}
    return out, None


def run_task(job: BlockJob, maker, task: dict) -> dict:
    """Read, align and write one task; returns (and commits with) its statistics."""
    lines, good, rejects = 0, [], []
    matched: dict[str, set[str]] = {s: set() for s in job.subsets}
    for row in task_rows(job, task):
        lines += 1
        if row is None:
            continue
        mark_row(row, job.subsets, matched)
        if row.reason:
            rejects.append(reject_record(row, job.source, row.reason, row.detail))
            continue
        face, rejected = process_row(maker, vars(row), job.source)
        if face is None:
            rejects.append(rejected)
        else:
            good.append(face)
    # A fixed shuffle inside the block: its runs come from all over the input, so every row group
    # of its shards mixes them (identity-sorted sources give no one-identity row groups).
    order = np.random.default_rng([ORDER_SEED, task["block"], task["lo"]]).permutation(len(good))
    good = [good[i] for i in order]
    stats = block_stats(job, task, lines, good, rejects, matched)
    shards = {split: pa.Table.from_pylist([r for r in good if r["split"] == split], schema=SHARD_SCHEMA)
              for split in sorted({r["split"] for r in good})}
    return write_task_output(job.out, task["name"], shards, pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA),
                             stats)


def block_stats(job: BlockJob, task: dict, lines: int, good: list[dict], rejects: list[dict],
                matched: dict[str, set[str]]) -> dict:
    splits = {}
    for split in sorted({r["split"] for r in good}):
        rows = [r for r in good if r["split"] == split]
        labels = np.asarray([r["label"] for r in rows], np.int64)
        flags = np.asarray([r["flags"] for r in rows], np.int64)
        marks = dict(SUBSET_FLAGS, align_fallback=FLAG_ALIGN_FALLBACK)
        info = {"rows": len(rows), "flags": {name: int(((flags & bit) != 0).sum()) for name, bit in marks.items()}}
        if job.per_class:
            info["per_class"] = np.bincount(labels[labels >= 0], minlength=job.per_class).tolist()
        else:
            info["labels"] = np.unique(labels).tolist()
        splits[split] = info
    fallbacks = [{"key": r["key"], "detail": r["detail"]} for r in good if r["detail"]][:FALLBACK_EXAMPLES]
    return {"name": task["name"], "block": task["block"], "lo": task["lo"], "hi": task["hi"], "lines": lines,
            "rows_in": len(good) + len(rejects), "written": len(good), "rejected": len(rejects),
            "splits": splits, "reasons": dict(Counter(r["reason"] for r in rejects)),
            "subsets": {s: sorted(v) for s, v in matched.items()}, "fallbacks": fallbacks}


class BlockPreparer:
    """The Ray Data actor: loads dlib once, then runs tasks (one per batch row); returns their statistics."""

    def __init__(self, job: BlockJob, log_dir: str = ""):
        if log_dir:  # a native crash leaves its trace in the dataset's logs/, not on the terminal
            redirect_stderr(Path(log_dir) / f"align-{os.getpid()}.log", "align")
        self.job = job
        self.maker = FACE_MAKERS[job.options.detector](job.options, job.quality, job.resize)

    def __call__(self, batch: pa.Table) -> pa.Table:
        stats = [json.dumps(run_task(self.job, self.maker, json.loads(t))) for t in batch.column("task").to_pylist()]
        return pa.table({"stats": pa.array(stats, pa.string())})
