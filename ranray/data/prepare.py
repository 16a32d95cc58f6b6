"""`ranray prepare`: raw dataset -> aligned Parquet shards + rejects + manifest, on Ray Data.

    driver: plan (structural errors stop here, before Ray starts; nothing is held per row)
      -> blocks: runs of input lines by byte offset (ranray.data.sources.lines), one task each
      -> Ray Data actor pool: each task reads, aligns and writes its own shards, rejects and a
         marker with its statistics (ranray.data.prepare_worker); only the statistics come back
      -> driver: manifest from the markers, rejects merged, work folder renamed onto the output

Every input row is either written or rejected with a reason (rows_in == written + rejected, per
block and in total, is checked and stored). The work folder `.<out>.partial` beside the output
holds the committed blocks of a killed run: the same command again re-aligns only the rest
(`resume`). Blocks gather runs of lines from across the input and shuffle them, so every row group
mixes classes or identities and the loader's windowed shuffle works on sorted sources too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow.parquet as pq

from ranray.config import ConfigError, PrepareConfig, to_dict
from ranray.data.align import AlignOptions
from ranray.data.prepare_worker import BlockJob, BlockPreparer, reject_record, task_rows
from ranray.data.schema import FACE_SIZE, REJECT_SCHEMA, SCHEMA_VERSION, synthetic_inputs
from ranray.data.shards import MARKERS, REJECT_PARTS, OutputLocation, read_marker, read_markers, write_task_output
from ranray.data.sources import PLANNERS, SourcePlan
from ranray.data.sources.lines import cut
from ranray.data.sources.subsets import load_list, subset_report
from ranray.ray_runtime import ensure_ray

log = logging.getLogger("ranray.prepare")

EXPRESSION_SOURCES = {"ferplus", "rafdb", "affectnet", "imagefolder"}
MIN_BLOCKS = 64  # small inputs still give every worker several blocks
MIN_BLOCK_ROWS = 16
WORK_MARK = ".ranray-prepare"  # in a work folder: prepare made it, so prepare may delete it
LISTING_DIR = "listing"
# Keys that do not change what a prepare writes: a resumed run may change them.
RUNTIME_KEYS = {"num_workers", "worker_retries", "batch_size", "overwrite", "progress_every", "resume"}
WORKER_DIED = ("the align worker died on this row, alone in its task (a native crash in dlib or the image "
               "decoder, or out of memory); logs/align-<pid>.log holds a crash's trace")


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
    resumed_blocks: int = 0

    def line(self) -> str:
        splits = ", ".join(f"{s} {n}" for s, n in self.split_rows.items())
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.rejects_by_reason.items(), key=lambda kv: -kv[1]))
        rate = self.rows_written / self.seconds if self.seconds > 0 else 0.0
        resumed = f", {self.resumed_blocks} blocks kept from a killed run" if self.resumed_blocks else ""
        return (f"prepared {self.source} -> {self.out}: {self.rows_in} rows in, {self.rows_written} written "
                f"({splits}), {self.rows_rejected} rejected ({reasons or 'none'}), {self.align_fallback} "
                f"fallback-aligned, {rate:.1f} faces/s in {self.seconds:.1f} s{resumed}")


def prepare(cfg: PrepareConfig, progress: Callable[[str], None] | None = None) -> PrepareSummary:
    """Run the whole preparation; raises ConfigError (or SourceError) before Ray for bad inputs.

    progress: receives a line every `progress_every` blocks (default: the ranray.prepare log).
    """
    cfg.validate()
    if cfg.label_mode != "majority" and cfg.source != "ferplus":
        raise ConfigError(f"config key 'label_mode' {cfg.label_mode!r} needs vote counts: only source ferplus has them")
    started = time.perf_counter()
    out = OutputLocation(cfg.out)
    check_output_location(out, cfg.overwrite)
    work = open_work(out, cfg.resume)
    try:
        plan, blocks = _plan(cfg, work)
        job = _job(cfg, plan, work)
        fresh = _fingerprint_check(work, cfg, plan, blocks)
    except BaseException:
        if work is not out and not work.files(MARKERS):  # nothing worth resuming: leave no trace
            work.delete_dir()
        raise
    if fresh:
        _reset(work)
    done = read_markers(work)
    tasks = pending_tasks(blocks, done)
    reporter = Progress(len(blocks), sum(b["hi"] for b in blocks), cfg.progress_every, progress or log.info)
    reporter.start(blocks, done)
    if tasks:
        run_all(tasks, job, cfg, reporter, log_dir=_log_dir(work))
    manifest = finalize(work, cfg, plan, job, blocks, time.perf_counter() - started)
    manifest["resumed_blocks"] = 0 if fresh else reporter.kept
    work.write_bytes("manifest.json", json.dumps(manifest, indent=1).encode())
    commit_output(work, out, cfg.overwrite)
    return _summary(Path(cfg.out), manifest)


# ---------------------------------------------------------------------------------------------
# Output and work folder
# ---------------------------------------------------------------------------------------------


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless told; never delete a folder that is not a prepared dataset."""
    check_output_location(OutputLocation(str(out)), overwrite)


def check_output_location(out: OutputLocation, overwrite: bool) -> None:
    if not out.exists() or not out.files():
        return
    if not overwrite:
        raise ConfigError(f"config key 'out' {out.where} already exists; pass --overwrite (overwrite=true) to replace it")
    if not out.exists("manifest.json"):
        raise ConfigError(f"config key 'out' {out.where} exists and is not a prepared dataset (no manifest.json); "
                          "refusing to replace it")


def work_location(out: OutputLocation) -> OutputLocation:
    """Local outputs are built in `.<name>.partial` beside them and renamed; on an object store the
    output is built in place and manifest.json, written last, marks it complete."""
    if not out.local:
        return out
    path = Path(out.root)
    return OutputLocation(str(path.parent / f".{path.name}.partial"))


def open_work(out: OutputLocation, resume: bool) -> OutputLocation:
    """The work folder, made (or kept, for a resume) and proven writable before Ray starts."""
    work = work_location(out)
    try:
        if work.exists() and work.files() and not work.exists(WORK_MARK) and work is not out:
            raise ConfigError(f"config key 'out': {work.where} exists and was not made by prepare; "
                              "refusing to use or delete it")
        if work.exists(WORK_MARK) and not resume:
            work.delete_dir()
        work.mkdir()
        work.write_bytes(WORK_MARK, b"ranray prepare work folder\n")
    except OSError as err:
        raise ConfigError(f"config key 'out' {out.where} cannot be written: {err}") from None
    return work


def _reset(work: OutputLocation) -> None:
    """Drop what an earlier run of another plan left (the listing and plan.json were just rewritten)."""
    for rel in work.files():
        if not rel.startswith((f"{LISTING_DIR}/", "logs/")) and rel not in (WORK_MARK, "plan.json"):
            work.delete(rel)


def _log_dir(work: OutputLocation) -> str:
    return str(Path(work.root) / "logs") if work.local else ""


def commit_output(work: OutputLocation, out: OutputLocation, overwrite: bool) -> None:
    for rel in (WORK_MARK, "plan.json"):
        if work.exists(rel):
            work.delete(rel)
    work.delete_dir(LISTING_DIR)
    if work is not out:
        commit(Path(work.root), Path(out.root), overwrite)


def commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished work dir onto the output (rename: the output is complete or absent)."""
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


# ---------------------------------------------------------------------------------------------
# Plan: blocks of runs of lines
# ---------------------------------------------------------------------------------------------


def block_rows(cfg: PrepareConfig, rows: int) -> int:
    """Rows per block: rows_per_shard, fewer for small inputs (every worker gets blocks). Depends on
    the input and the config only, never on the worker count: a resumed run plans the same blocks."""
    return max(1, min(cfg.rows_per_shard, max(MIN_BLOCK_ROWS, math.ceil(rows / MIN_BLOCKS))))


def _plan(cfg: PrepareConfig, work: OutputLocation) -> tuple[SourcePlan, list[dict]]:
    if not work.local and cfg.source in ("imagefolder", "identity"):
        raise ConfigError(f"config key 'out' {cfg.out}: folder sources write their listing into the work "
                          "folder; give a local or mounted path")
    plan = PLANNERS[cfg.source](cfg, Path(work.root) / LISTING_DIR)
    per_block = block_rows(cfg, plan.rows)
    segments = cut(plan.groups, max(1, math.ceil(per_block / cfg.segments_per_shard)))
    count = max(1, math.ceil(len(segments) / cfg.segments_per_shard)) if len(segments) else 0
    blocks = []
    for b in range(count):
        # Block b takes every count-th run: runs from all over the input, so sorted inputs mix.
        segs = [segments.describe(i) for i in range(b, len(segments), count)]
        blocks.append({"name": f"{b:06d}", "block": b, "lo": 0, "hi": sum(s[2] for s in segs), "segments": segs})
    return plan, blocks


def _job(cfg: PrepareConfig, plan: SourcePlan, work: OutputLocation) -> BlockJob:
    return BlockJob(source=cfg.source, groups=plan.groups, parser=plan.parser, out=work, options=align_options(cfg),
                    quality=cfg.jpeg_quality, resize=cfg.resize,
                    per_class=len(plan.class_names) if cfg.source in EXPRESSION_SOURCES else 0,
                    subsets={s: load_list(p) for s, p in cfg.subset_lists.items()})


def align_options(cfg: PrepareConfig) -> AlignOptions:
    return AlignOptions(detector=cfg.detector, template=align_template(cfg), fallback=cfg.align_fallback)


def align_template(cfg: PrepareConfig) -> str:
    """`align_template`, with auto resolved: FER2013's own frame for FER2013's crops (the ferplus
    source); insightface's for photos and for ranray's synthetic faces, which are drawn in a looser
    frame than FER2013's and on which the demo and the occlusion study were measured."""
    if cfg.align_template != "auto":
        return cfg.align_template
    return "fer2013" if cfg.source == "ferplus" and not synthetic_inputs(cfg.inputs) else "insightface"


def _fingerprint(cfg: PrepareConfig, plan: SourcePlan, blocks: list[dict]) -> str:
    """What the output depends on: the config (less runtime keys), the line files' bytes, the blocks,
    the inputs' sizes and times (a .rec is not hashed: tens of GB)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in to_dict(cfg).items() if k not in RUNTIME_KEYS},
                             sort_keys=True).encode())
    digest.update(json.dumps(blocks).encode())
    for path in map(Path, cfg.inputs):  # the .rec files and image folders beside the hashed line files
        if path.exists():
            digest.update(f"{path.resolve()} {path.stat().st_size} {path.stat().st_mtime_ns}".encode())
    for group in plan.groups:
        for path in group.files:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
    return digest.hexdigest()


def _fingerprint_check(work: OutputLocation, cfg: PrepareConfig, plan: SourcePlan, blocks: list[dict]) -> bool:
    """True when the work folder must start afresh (first run, or another plan's leftovers)."""
    mark = _fingerprint(cfg, plan, blocks)
    kept = json.loads(work.read_bytes("plan.json")).get("fingerprint") if work.exists("plan.json") else None
    if kept != mark:
        if kept is not None:
            log.warning("prepare: %s holds a killed run of other inputs or settings; starting afresh", work.where)
        work.write_bytes("plan.json", json.dumps({"fingerprint": mark, "blocks": len(blocks)}).encode())
        return True
    return False


def row_parts(done: dict[str, dict]) -> dict[int, list[dict]]:
    """Committed one-row tasks by block."""
    parts: dict[int, list[dict]] = {}
    for name, stats in done.items():
        if "-" in name:
            parts.setdefault(stats["block"], []).append(stats)
    return parts


def pending_tasks(blocks: list[dict], done: dict[str, dict]) -> list[dict]:
    """Blocks not committed; a block a killed run was isolating row by row continues that way."""
    tasks = []
    parts = row_parts(done)
    for block in blocks:
        if block["name"] in done:
            continue
        kept = parts.get(block["block"])
        tasks += isolation_tasks(block, kept) if kept else [block]
    return tasks


def isolation_tasks(block: dict, committed: list[dict]) -> list[dict]:
    """One task per line of the block not yet committed."""
    covered = {p for s in committed for p in range(s["lo"], s["hi"])}
    return [dict(block, name=f"{block['name']}-{p:05d}", lo=p, hi=p + 1)
            for p in range(block["lo"], block["hi"]) if p not in covered]


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------


def num_workers(cfg: PrepareConfig, num_tasks: int) -> int:
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(cfg.num_workers or cpus, num_tasks))


def run_all(tasks: list[dict], job: BlockJob, cfg: PrepareConfig, reporter: "Progress", log_dir: str) -> None:
    """All tasks on an actor pool. An actor that dies (a native crash in dlib or a decoder, the OOM
    killer) is restarted and its task retried `worker_retries` times; a block that still fails is
    run again one row per task, and rows that still kill their worker become `worker_died` rejects."""
    ensure_ray()
    _run_pass(tasks, job, cfg, cfg.worker_retries, reporter, log_dir)
    done = read_markers(job.out)
    failed = [t for t in tasks if t["name"] not in done]
    if not failed:
        return
    log.warning("prepare: align workers died on %d task(s) after %d retries; running their rows one by one",
                len(failed), cfg.worker_retries)
    rows = [r for t in failed for r in (isolation_tasks(t, []) if t["hi"] - t["lo"] > 1 else [t])]
    _run_pass(rows, job, cfg, 0, reporter, log_dir)
    done = read_markers(job.out)
    for task in (t for t in rows if t["name"] not in done):
        reporter.update(worker_died(job, task))


def worker_died(job: BlockJob, task: dict) -> dict:
    """Commit a one-row task whose worker died each time: its row becomes a `worker_died` reject."""
    import pyarrow as pa

    rows = [r for r in task_rows(job, task) if r is not None]
    rejects = [reject_record(r, job.source, r.reason or "worker_died", r.detail or WORKER_DIED) for r in rows]
    stats = {"name": task["name"], "block": task["block"], "lo": task["lo"], "hi": task["hi"],
             "lines": task["hi"] - task["lo"], "rows_in": len(rows), "written": 0, "rejected": len(rows),
             "splits": {}, "reasons": dict(Counter(r["reason"] for r in rejects)),
             "subsets": {s: [] for s in job.subsets}, "fallbacks": []}
    return write_task_output(job.out, task["name"], {}, pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), stats)


def _run_pass(tasks: list[dict], job: BlockJob, cfg: PrepareConfig, retries: int, reporter: "Progress",
              log_dir: str) -> None:
    for stats in _stats_stream(tasks, job, cfg, retries, log_dir):
        reporter.update(stats)


def _stats_stream(tasks: list[dict], job: BlockJob, cfg: PrepareConfig, retries: int, log_dir: str) -> Iterator[dict]:
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = ctx.max_errored_blocks, ctx.enable_progress_bars
    ctx.max_errored_blocks = -1  # a task whose worker died is skipped here and run again by the caller
    ctx.enable_progress_bars = False  # prepare prints its own progress lines
    try:
        ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
        with warnings.catch_warnings():
            # Ray 2.60 names no parameter for an actor's task retries: it still goes through the
            # ray_remote_args Ray says it will remove in 2.64 (pinned at 2.60 in pyproject.toml).
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", category=DeprecationWarning)
            ds = ds.map_batches(BlockPreparer, fn_constructor_kwargs={"job": job, "log_dir": log_dir},
                                batch_size=1, batch_format="pyarrow", num_cpus=1, max_task_retries=retries,
                                compute=ray.data.ActorPoolStrategy(size=num_workers(cfg, len(tasks))))
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for stats in batch.column("stats").to_pylist():
                yield json.loads(stats)
    finally:
        ctx.max_errored_blocks, ctx.enable_progress_bars = saved


class Progress:
    """A line every `every` blocks and at the end: blocks, rows, rows/s, ETA."""

    def __init__(self, blocks: int, lines: int, every: int, emit: Callable[[str], None]):
        self.blocks, self.lines, self.every, self.emit = blocks, lines, every, emit
        self.done_blocks = self.done_lines = self.kept = self.kept_lines = self.tasks = 0
        self.started = time.perf_counter()

    def start(self, blocks: list[dict], done: dict[str, dict]) -> None:
        self.kept = self.done_blocks = sum(b["name"] in done for b in blocks)
        self.done_lines = self.kept_lines = sum(s["lines"] for s in done.values())
        if done:
            self.emit(f"prepare: resuming: {self.kept} block(s) of a killed run kept ({self.done_lines} rows)")

    def update(self, stats: dict) -> None:
        self.done_lines += stats["lines"]
        self.tasks += 1
        self.done_blocks += "-" not in stats["name"]  # one-row tasks of a failed block count as rows only
        if self.tasks % self.every == 0 or self.done_lines >= self.lines:
            self.emit(self.line())

    def line(self) -> str:
        seconds = time.perf_counter() - self.started
        rate = (self.done_lines - self.kept_lines) / seconds if seconds > 0 else 0.0
        left = self.lines - self.done_lines
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        pct = 100.0 * self.done_lines / self.lines if self.lines else 100.0
        return (f"prepare: {self.done_blocks}/{self.blocks} blocks, {self.done_lines}/{self.lines} rows "
                f"({pct:.0f}%), {rate:.1f} rows/s, ETA {eta}")


# ---------------------------------------------------------------------------------------------
# Finalize: manifest from the markers
# ---------------------------------------------------------------------------------------------


def finalize(work: OutputLocation, cfg: PrepareConfig, plan: SourcePlan, job: BlockJob, blocks: list[dict],
             seconds: float) -> dict[str, Any]:
    markers = committed_markers(work, blocks)
    totals = _totals(work, markers, job)
    if totals["lines"] != sum(b["hi"] for b in blocks):
        raise RuntimeError(f"prepare: the blocks saw {totals['lines']} input lines, the plan has "
                           f"{sum(b['hi'] for b in blocks)}: an input changed during the run")
    if totals["rows_in"] != totals["written"] + totals["rejected"]:
        raise RuntimeError(f"prepare lost rows: {totals['rows_in']} in, {totals['written']} written + "
                           f"{totals['rejected']} rejected")
    _merge_rejects(work, markers)
    _remove_leftovers(work, markers)
    _write_extras(work, cfg, plan)
    return build_manifest(cfg, plan, totals, seconds)


def committed_markers(work: OutputLocation, blocks: list[dict]) -> list[dict]:
    """The markers that make up the output: each block's whole-block marker, or its one-row ones."""
    done = read_markers(work)
    by_block = row_parts(done)
    chosen = []
    for block in blocks:
        if block["name"] in done:
            chosen.append(done[block["name"]])
            continue
        parts = sorted(by_block.get(block["block"], []), key=lambda s: s["lo"])
        covered = sorted(p for s in parts for p in range(s["lo"], s["hi"]))
        if covered != list(range(block["lo"], block["hi"])):
            raise RuntimeError(f"prepare: block {block['name']} was not completed")
        chosen += parts
    return chosen


def _totals(work: OutputLocation, index: list[dict], job: BlockJob) -> dict[str, Any]:
    """The manifest's counts from the committed markers, read one at a time (memory: one marker plus
    the identity sets, never all markers' label lists at once)."""
    totals: dict[str, Any] = {"lines": 0, "rows_in": 0, "written": 0, "rejected": 0, "reasons": Counter(),
                              "splits": {}, "subsets": {s: set() for s in job.subsets}, "fallbacks": []}
    labels: dict[str, set[int]] = {}
    for m in (read_marker(work, entry["name"]) for entry in index):
        for key in ("lines", "rows_in", "written", "rejected"):
            totals[key] += m[key]
        if m["rows_in"] != m["written"] + m["rejected"]:
            raise RuntimeError(f"prepare lost rows in task {m['name']}: {m['rows_in']} in, {m['written']} written "
                               f"+ {m['rejected']} rejected")
        totals["reasons"].update(m["reasons"])
        for subset, names in m["subsets"].items():
            totals["subsets"][subset].update(names)
        totals["fallbacks"] += m["fallbacks"][:max(0, 20 - len(totals["fallbacks"]))]
        for split, info in m["splits"].items():
            st = totals["splits"].setdefault(split, {"rows": 0, "shards": 0, "per_class": [], "flags": Counter()})
            st["rows"] += info["rows"]
            st["shards"] += 1
            st["flags"].update(info["flags"])
            if job.per_class:
                st["per_class"] = [a + b for a, b in zip(st["per_class"] or [0] * job.per_class, info["per_class"])]
            else:
                labels.setdefault(split, set()).update(info["labels"])
    for split, st in totals["splits"].items():
        st["flags"] = dict(st["flags"])
        if not job.per_class:
            st["identities"] = len(labels.get(split, ()))
    totals["splits"] = dict(sorted(totals["splits"].items()))
    return totals


def _merge_rejects(work: OutputLocation, markers: list[dict]) -> None:
    """rejects.parquet from the tasks' reject files, one file in memory at a time."""
    with pq.ParquetWriter(work.path("rejects.parquet"), REJECT_SCHEMA, filesystem=work.fs) as writer:
        for m in markers:
            if m["rejects_file"]:
                writer.write_table(work.read_table(m["rejects_file"]).cast(REJECT_SCHEMA))


def _remove_leftovers(work: OutputLocation, markers: list[dict]) -> None:
    """Shards of tasks that never committed (a worker killed mid-write) and the per-task files."""
    keep = {f for m in markers for f in m["files"].values()}
    for rel in work.files():
        top = rel.split("/", 1)[0]
        if top in (MARKERS, REJECT_PARTS) or ("/part-" in rel and rel not in keep):
            work.delete(rel)
    for folder in (MARKERS, REJECT_PARTS):
        work.delete_dir(folder)


def build_manifest(cfg: PrepareConfig, plan: SourcePlan, totals: dict, seconds: float) -> dict[str, Any]:
    expressions = cfg.source in EXPRESSION_SOURCES
    subsets = subset_report({s: load_list(p) for s, p in cfg.subset_lists.items()}, totals["subsets"])
    return {
        "schema_version": SCHEMA_VERSION,
        "source": cfg.source,
        "num_classes": len(plan.class_names),  # the dataset's own class set (RAF-DB 7, AffectNet 7 or 8)
        # Identity sources can hold millions of names: those go to identities.txt instead.
        "class_names": list(plan.class_names) if expressions else [],
        "label_mode": cfg.label_mode,
        "splits": totals["splits"],
        "rows_in": totals["rows_in"],
        "rows_written": totals["written"],
        "rows_rejected": totals["rejected"],
        "rejects_by_reason": dict(totals["reasons"].most_common()),
        "subset_lists": subsets,
        "face_size": FACE_SIZE,
        "detector": cfg.detector,
        "align_template": align_template(cfg),  # where the faces sit in the frame: predict must align photos alike
        "reader": plan.extra,
        "align_fallback_examples": totals["fallbacks"],
        "seconds": round(seconds, 2),
        "config": to_dict(cfg),
        "code_version": code_version(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_extras(work: OutputLocation, cfg: PrepareConfig, plan: SourcePlan) -> None:
    """Identity names (index = label) and verification pairs files travel with the shards."""
    if cfg.source in EXPRESSION_SOURCES:
        return
    work.write_bytes("identities.txt", "".join(f"{name}\n" for name in plan.class_names).encode())
    for i, pairs in enumerate(plan.extra.get("pairs_files", [])):
        work.write_bytes("pairs.txt" if i == 0 else f"pairs-{i}.txt", Path(pairs).read_bytes())


def _summary(out: Path, manifest: dict) -> PrepareSummary:
    return PrepareSummary(
        out=out, source=manifest["source"], rows_in=manifest["rows_in"], rows_written=manifest["rows_written"],
        rows_rejected=manifest["rows_rejected"],
        split_rows={s: v["rows"] for s, v in manifest["splits"].items()},
        rejects_by_reason=manifest["rejects_by_reason"],
        align_fallback=sum(v["flags"].get("align_fallback", 0) for v in manifest["splits"].values()),
        seconds=manifest["seconds"], resumed_blocks=manifest.get("resumed_blocks", 0))


def code_version() -> str:
    import ranray

    version = ranray.__version__
    try:
        repo = Path(__file__).resolve().parent
        commit_id = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                   text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+{commit_id}{'.dirty' if dirty else ''}" if commit_id else version
