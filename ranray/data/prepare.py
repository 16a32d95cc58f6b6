"""`ranray prepare`: raw dataset -> aligned Parquet shards + rejects + manifest, on Ray Data.

    read (driver: SourceRows; structural errors stop here, before Ray starts)
      -> Ray Data: rows -> map_batches(AlignBatch actors, each holding dlib once) -> face or reject
      -> driver: Parquet shards per split, rejects.parquet, manifest.json
      -> temp dir renamed onto the output at the very end

Every input row is either written or rejected with a reason (rows_in == written + rejected is
checked and stored). A partial output of a killed run is a hidden temp dir beside the output, never
a directory with a manifest. Rows are written in a fixed pseudo-random order, so every row group
mixes classes and the loader's block shuffle works on sorted sources (image folders) too.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import json
import logging
import math
import os
import shutil
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from ranray.config import CLASS_NAMES, ConfigError, PrepareConfig, to_dict
from ranray.data.align import AlignOptions, FaceAligner
from ranray.data.schema import (FACE_SIZE, FLAG_ALIGN_FALLBACK, REJECT_SCHEMA, SCHEMA_VERSION, SHARD_SCHEMA,
                                SUBSET_FLAGS)
from ranray.data.sources import READERS, RowReject, SourceRead, SourceRow, mark_subsets
from ranray.data.sources.common import IMAGE_FILE, IMAGE_PIXELS, IMAGE_RECORD, rows_to_table
from ranray.data.sources.recordio import RecordIOError, read_record_at, unpack
from ranray.data.synth import SynthOptions, SynthResult, synthesize
from ranray.ray_runtime import ensure_ray
from ranray.train.failures import redirect_stderr

ROW_GROUP_ROWS = 256  # the loader shuffles whole row groups; 256 faces is ~1.5 MB of JPEG
MIN_IMAGE_SIDE = 16  # smaller "images" hold no face worth aligning
FER_SIDE = 48  # FER2013 pixels rows are 48x48
ORDER_SEED = 0
FALLBACK_EXAMPLES = 20
# Rows leaving the actors: a shard row plus the reject reason ("" for a written face).
log = logging.getLogger("ranray.prepare")

OUT_SCHEMA = pa.schema(list(SHARD_SCHEMA) + [pa.field("reason", pa.string()), pa.field("detail", pa.string())])
EXPRESSION_SOURCES = {"ferplus", "rafdb", "affectnet", "imagefolder"}


# ---------------------------------------------------------------------------------------------
# Worker side: one AlignBatch per Ray actor
# ---------------------------------------------------------------------------------------------


def _decode(source: Path | io.BytesIO, where: str) -> Image.Image:
    try:
        with Image.open(source) as img:
            img.load()  # decode now: a truncated or corrupt file fails here, not later
            img = ImageOps.exif_transpose(img)  # phone photos store their rotation in EXIF
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise RowReject("corrupt_image", f"{where}: {type(err).__name__}: {err}") from None


def _load_file(row: dict) -> Image.Image:
    path = Path(row["path"])
    if not path.is_file():
        raise RowReject("missing_file", str(path))
    return _decode(path, str(path))


@functools.lru_cache(maxsize=8)
def _record_file(path: str) -> BinaryIO:
    # Kept open for the actor's life: a batch reads many records of one .rec, each at its offset.
    return open(path, "rb")


def _load_record(row: dict) -> Image.Image:
    where = f"{row['path']} ({row['key']})"
    try:
        _, image = unpack(read_record_at(_record_file(row["path"]), row["offset"]))
    except (OSError, RecordIOError) as err:
        raise RowReject("corrupt_image", f"{where}: {type(err).__name__}: {err}") from None
    return _decode(io.BytesIO(image), where)


def _load_pixels(row: dict) -> Image.Image:
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


IMAGE_LOADERS: dict[str, Callable[[dict], Image.Image]] = {
    IMAGE_FILE: _load_file, IMAGE_PIXELS: _load_pixels, IMAGE_RECORD: _load_record}


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class AlignBatch:
    """The Ray Data actor: loads dlib once, then aligns batches; never raises for a bad row."""

    def __init__(self, options: AlignOptions, source: str, jpeg_quality: int, log_dir: str = ""):
        if log_dir:  # as a Ray actor: a native crash leaves its trace in the dataset's logs/, not on the terminal
            redirect_stderr(Path(log_dir) / f"align-{os.getpid()}.log", "align")
        self.aligner = FaceAligner(options)
        self.source = source
        self.quality = jpeg_quality

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.process(row) for row in batch.to_pylist()], schema=OUT_SCHEMA)

    def process(self, row: dict) -> dict:
        out = {"key": row["key"], "split": row["split"], "source": self.source, "label": row["label"],
               "flags": row["flags"], "reason": "", "detail": ""}
        try:
            out.update(self._face(row))
        except RowReject as rej:
            out.update(reason=rej.reason, detail=rej.detail)
        except Exception as err:  # noqa: BLE001 - a bad row must never kill the actor
            out.update(reason="error", detail=f"{type(err).__name__}: {err}")
        return out

    def _face(self, row: dict) -> dict:
        img = IMAGE_LOADERS[row["image_kind"]](row)
        if min(img.size) < MIN_IMAGE_SIDE:
            raise RowReject("image_too_small", f"{row['key']}: {img.size[0]}x{img.size[1]}")
        box = tuple(row["box"]) if row["box"] else None
        aligned = self.aligner.align(img, box=box, hint=np.asarray(row["landmarks"]) if row["landmarks"] else None)
        flags = row["flags"] | (FLAG_ALIGN_FALLBACK if aligned.fallback else 0)
        target = row["target"]
        return {"image": _jpeg(aligned.image, self.quality), "target": target, "votes": row["votes"],
                "landmarks": aligned.landmarks.reshape(-1).tolist(), "flags": flags, "detail": aligned.detail}


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


@dataclass
class PrepareSummary:
    out: Path
    source: str
    rows_in: int
    rows_written: int
    rows_rejected: int
    split_rows: dict[str, int]
    rejects_by_reason: dict[str, int]
    align_fallback: int
    seconds: float

    def line(self) -> str:
        splits = ", ".join(f"{s} {n}" for s, n in self.split_rows.items())
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.rejects_by_reason.items(), key=lambda kv: -kv[1]))
        rate = self.rows_written / self.seconds if self.seconds > 0 else 0.0
        return (f"prepared {self.source} -> {self.out}: {self.rows_in} rows in, {self.rows_written} written "
                f"({splits}), {self.rows_rejected} rejected ({reasons or 'none'}), {self.align_fallback} "
                f"fallback-aligned, {rate:.1f} faces/s in {self.seconds:.1f} s")


def prepare(cfg: PrepareConfig) -> PrepareSummary:
    """Run the whole preparation; raises ConfigError (or SourceError) before Ray for bad inputs."""
    cfg.validate()
    if cfg.label_mode != "majority" and cfg.source != "ferplus":
        raise ConfigError(f"config key 'label_mode' {cfg.label_mode!r} needs vote counts: only source ferplus has them")
    out = Path(cfg.out)
    check_output(out, cfg.overwrite)
    started = time.perf_counter()
    read = READERS[cfg.source](cfg)
    subset_report = mark_subsets(read.rows, cfg.subset_lists)
    rows = _fixed_order(read.rows)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        writer = ShardWriter(tmp, cfg.rows_per_shard, _num_classes(cfg.source, read),
                             per_class=cfg.source in EXPRESSION_SOURCES)
        rejects = [_reject_record(r, cfg.source) for r in rows if r.reason]
        fallbacks: list[dict] = []  # a few examples of fallback-aligned rows and why, for the manifest
        for table in align_rows([r for r in rows if not r.reason], cfg, log_dir=tmp / "logs"):
            good = table.filter(pc.equal(table["reason"], ""))
            writer.write(good.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA))
            rejects += table.filter(pc.not_equal(table["reason"], "")).select(REJECT_SCHEMA.names).to_pylist()
            if len(fallbacks) < FALLBACK_EXAMPLES:
                noted = good.filter(pc.not_equal(good["detail"], "")).select(["key", "detail"])
                fallbacks += noted.slice(0, FALLBACK_EXAMPLES - len(fallbacks)).to_pylist()
        splits = writer.close()
        pq.write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), tmp / "rejects.parquet")
        manifest = build_manifest(cfg, read, splits, rejects, subset_report, time.perf_counter() - started)
        manifest["align_fallback_examples"] = fallbacks
        _write_extras(tmp, cfg, read)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        commit(tmp, out, cfg.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _summary(out, manifest)


def prepare_synthetic(raw_dir: str | Path, out_dir: str | Path, options: SynthOptions | None = None,
                      **overrides: Any) -> PrepareSummary:
    """Synthesize a dataset into raw_dir (kept if already there with the same options), then prepare it.

    The one call the demo and tests need, e.g.
        prepare_synthetic("runs/demo/raw", "runs/demo/data", SynthOptions(n=2000, seed=0), num_workers=2)
    `overrides` are PrepareConfig fields (num_workers, overwrite, label_mode, ...).
    """
    opts = options or SynthOptions()
    raw = Path(raw_dir)
    info = raw / "synth.json"
    if info.is_file():
        kept = json.loads(info.read_text())
        if kept["options"] != json.loads(json.dumps(asdict(opts))):
            raise ConfigError(f"{raw} holds a synthetic dataset made with other options; use another folder")
        lists = {k: str(raw / f"{k}_list.txt") for k in SUBSET_FLAGS}
        result = SynthResult(root=raw, options=opts, counts=kept["counts"], subset_lists=lists)
    else:
        result = synthesize(raw, opts)
    return prepare(result.prepare_config(out_dir, **overrides))


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless told; never delete a folder that is not a prepared dataset."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise ConfigError(f"config key 'out' {out} already exists; pass --overwrite (overwrite=true) to replace it")
    if not (out / "manifest.json").is_file():
        raise ConfigError(f"config key 'out' {out} exists and is not a prepared dataset (no manifest.json); "
                          "refusing to replace it")


def commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished temp dir onto the output (rename: the output is complete or absent)."""
    if out.exists() and any(out.iterdir()):
        check_output(out, overwrite)
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)


def _fixed_order(rows: list[SourceRow]) -> list[SourceRow]:
    order = np.random.default_rng(ORDER_SEED).permutation(len(rows))
    return [rows[i] for i in order]


def _num_classes(source: str, read: SourceRead) -> int:
    return len(CLASS_NAMES) if source in EXPRESSION_SOURCES else len(read.class_names)


def _reject_record(row: SourceRow, source: str) -> dict:
    return {"key": row.key, "source": source, "split": row.split, "reason": row.reason, "detail": row.detail}


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------


def num_workers(cfg: PrepareConfig, num_rows: int) -> int:
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    wanted = cfg.num_workers or cpus
    return max(1, min(wanted, num_rows))


def align_options(cfg: PrepareConfig) -> AlignOptions:
    return AlignOptions(detector=cfg.detector, fallback=cfg.align_fallback)


def align_rows(rows: list[SourceRow], cfg: PrepareConfig, log_dir: Path | None = None) -> Iterator[pa.Table]:
    """Aligned rows (OUT_SCHEMA tables), from an actor pool on Ray Data; every row comes back.

    An actor that dies (a native crash in dlib or a decoder, the OOM killer) is restarted and its
    block retried `worker_retries` times. Rows of blocks that still fail are aligned again one row
    per block, so that only the rows that kill a worker are lost; those come back as
    `worker_died` rejects. With `log_dir`, each actor's stderr goes to log_dir/align-<pid>.log.
    """
    if not rows:
        return
    ensure_ray()
    workers = num_workers(cfg, len(rows))
    # Small inputs get small batches, so that every actor has work.
    batch = max(1, min(cfg.batch_size, math.ceil(len(rows) / (workers * 4))))
    seen: set[str] = set()
    logs = str(log_dir or "")
    for table in _align_pass(rows, cfg, workers, batch, cfg.worker_retries, logs):
        seen.update(table["key"].to_pylist())
        yield table
    lost = [r for r in rows if r.key not in seen]
    if lost:
        log.warning("prepare: align workers died on %d rows after %d retries; aligning them one by one",
                    len(lost), cfg.worker_retries)
        for table in _align_pass(lost, cfg, min(workers, len(lost)), 1, 0, logs):
            seen.update(table["key"].to_pylist())
            yield table
        dead = [r for r in lost if r.key not in seen]
        if dead:
            yield worker_died_rejects(dead, cfg.source)


def worker_died_rejects(rows: list[SourceRow], source: str) -> pa.Table:
    detail = ("the align worker died on this row, alone in its block (a native crash in dlib or the image "
              "decoder, or out of memory); logs/align-<pid>.log holds a crash's trace")
    return pa.Table.from_pylist([{"key": r.key, "split": r.split, "source": source, "label": r.label,
                                  "flags": r.flags, "reason": "worker_died", "detail": detail} for r in rows],
                                schema=OUT_SCHEMA)


def _align_pass(rows: list[SourceRow], cfg: PrepareConfig, workers: int, batch: int, retries: int,
                log_dir: str) -> Iterator[pa.Table]:
    import ray

    table = rows_to_table(rows)
    blocks = [table.slice(i, batch) for i in range(0, len(rows), batch)]
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.max_errored_blocks
    ctx.execution_options.preserve_order = True  # same input, same shards
    ctx.max_errored_blocks = -1  # a block whose worker died is skipped here and accounted by the caller
    try:
        ds = ray.data.from_arrow(blocks).map_batches(
            AlignBatch, fn_constructor_kwargs={"options": align_options(cfg), "source": cfg.source,
                                               "jpeg_quality": cfg.jpeg_quality, "log_dir": log_dir},
            batch_size=batch, batch_format="pyarrow", num_cpus=1, max_task_retries=retries,
            compute=ray.data.ActorPoolStrategy(size=workers))
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)
    finally:
        ctx.execution_options.preserve_order, ctx.max_errored_blocks = saved


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


@dataclass
class _SplitState:
    writer: pq.ParquetWriter | None = None
    shards: int = 0
    in_shard: int = 0
    rows: int = 0
    pending: list[pa.Table] = field(default_factory=list)
    pending_rows: int = 0
    labels: list[np.ndarray] = field(default_factory=list)
    flags: list[np.ndarray] = field(default_factory=list)


class ShardWriter:
    """DIR/<split>/part-NNNNN.parquet, rows_per_shard rows each, in ROW_GROUP_ROWS row groups."""

    def __init__(self, root: Path, rows_per_shard: int, num_classes: int, per_class: bool = True):
        self.root = root
        self.rows_per_shard = max(1, rows_per_shard)
        self.num_classes = num_classes
        self.per_class = per_class  # False for identities: millions of counts help nobody
        self.splits: dict[str, _SplitState] = {}

    def write(self, table: pa.Table) -> None:
        for split in sorted(set(table.column("split").to_pylist())):
            part = table.filter(pc.equal(table["split"], split))
            st = self.splits.setdefault(split, _SplitState())
            st.pending.append(part)
            st.pending_rows += part.num_rows
            st.labels.append(part.column("label").to_numpy())
            st.flags.append(part.column("flags").to_numpy())
            while st.pending_rows >= ROW_GROUP_ROWS:
                self._flush(split, st, ROW_GROUP_ROWS)

    def close(self) -> dict[str, dict[str, Any]]:
        stats = {}
        for split, st in sorted(self.splits.items()):
            while st.pending_rows:
                self._flush(split, st, min(ROW_GROUP_ROWS, st.pending_rows))
            if st.writer is not None:
                st.writer.close()
            stats[split] = self._stats(st)
        return stats

    def _flush(self, split: str, st: _SplitState, n: int) -> None:
        """Write the first n pending rows, rolling over to a new shard at rows_per_shard."""
        pending = pa.concat_tables(st.pending)
        while n > 0:
            if st.writer is None or st.in_shard >= self.rows_per_shard:
                self._next_shard(split, st)
            take = min(n, self.rows_per_shard - st.in_shard)
            st.writer.write_table(pending.slice(0, take), row_group_size=ROW_GROUP_ROWS)
            pending = pending.slice(take)
            st.in_shard += take
            st.rows += take
            st.pending_rows -= take
            n -= take
        st.pending = [pending] if pending.num_rows else []

    def _next_shard(self, split: str, st: _SplitState) -> None:
        if st.writer is not None:
            st.writer.close()
        path = self.root / split / f"part-{st.shards:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        st.writer = pq.ParquetWriter(path, SHARD_SCHEMA)
        st.shards += 1
        st.in_shard = 0

    def _stats(self, st: _SplitState) -> dict[str, Any]:
        labels = np.concatenate(st.labels) if st.labels else np.zeros(0, dtype=np.int32)
        flags = np.concatenate(st.flags) if st.flags else np.zeros(0, dtype=np.int32)
        marks = dict(SUBSET_FLAGS, align_fallback=FLAG_ALIGN_FALLBACK)
        stats: dict[str, Any] = {"rows": st.rows, "shards": st.shards}
        if self.per_class:
            stats["per_class"] = np.bincount(labels[labels >= 0], minlength=self.num_classes).tolist()
        else:
            stats["per_class"] = []
            stats["identities"] = int(np.unique(labels).size)
        stats["flags"] = {name: int(((flags & bit) != 0).sum()) for name, bit in marks.items()}
        return stats


def build_manifest(cfg: PrepareConfig, read: SourceRead, splits: dict[str, dict], rejects: list[dict],
                   subset_report: dict, seconds: float) -> dict[str, Any]:
    written = sum(s["rows"] for s in splits.values())
    rows_in = len(read.rows)
    if rows_in != written + len(rejects):
        raise RuntimeError(f"prepare lost rows: {rows_in} in, {written} written + {len(rejects)} rejected")
    expressions = cfg.source in EXPRESSION_SOURCES
    return {
        "schema_version": SCHEMA_VERSION,
        "source": cfg.source,
        "num_classes": _num_classes(cfg.source, read),
        # Identity sources can hold millions of names: those go to identities.txt instead.
        "class_names": list(read.class_names) if expressions else [],
        "label_mode": cfg.label_mode,
        "splits": splits,
        "rows_in": rows_in,
        "rows_written": written,
        "rows_rejected": len(rejects),
        "rejects_by_reason": dict(Counter(r["reason"] for r in rejects).most_common()),
        "subset_lists": subset_report,
        "face_size": FACE_SIZE,
        "detector": cfg.detector,
        "reader": read.extra,
        "seconds": round(seconds, 2),
        "config": to_dict(cfg),
        "code_version": code_version(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_extras(tmp: Path, cfg: PrepareConfig, read: SourceRead) -> None:
    """Identity names (index = label) and verification pairs files travel with the shards."""
    if cfg.source in EXPRESSION_SOURCES:
        return
    (tmp / "identities.txt").write_text("".join(f"{name}\n" for name in read.class_names))
    for i, pairs in enumerate(read.extra.get("pairs_files", [])):
        shutil.copyfile(pairs, tmp / ("pairs.txt" if i == 0 else f"pairs-{i}.txt"))


def _summary(out: Path, manifest: dict) -> PrepareSummary:
    return PrepareSummary(
        out=out, source=manifest["source"], rows_in=manifest["rows_in"], rows_written=manifest["rows_written"],
        rows_rejected=manifest["rows_rejected"],
        split_rows={s: v["rows"] for s, v in manifest["splits"].items()},
        rejects_by_reason=manifest["rejects_by_reason"],
        align_fallback=sum(v["flags"]["align_fallback"] for v in manifest["splits"].values()),
        seconds=manifest["seconds"])


def code_version() -> str:
    import ranray

    version = ranray.__version__
    try:
        repo = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+{commit}{'.dirty' if dirty else ''}" if commit else version
