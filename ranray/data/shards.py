"""Streaming access to a prepared split (a light index, per-epoch orders, per-rank plans, a block
reader), and the write side that prepare's workers use (OutputLocation, per-task shards and markers).

Nothing here loads a whole split. The index holds, per Parquet row group ("block"), the selected row
numbers (int32) and nothing per row beyond that: keys, labels and images stay on disk until a batch
asks for them. For `subset="all"` the index comes from Parquet metadata alone; a subset filter reads
only the small `flags` column.

Order of an epoch (training): blocks are permuted with a (seed, epoch) RNG, then the rows of every
`shuffle_window` consecutive blocks are shuffled together. Each rank takes one contiguous slice of
that order, so a rank touches about 1/world_size of the blocks and holds at most one window of
decoded row groups in memory, while the mix across blocks keeps batches from being one-shard-only.
Evaluation keeps the stored order.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ranray.data.schema import NUM_LANDMARKS, SUBSET_FLAGS, DatasetError, shard_paths

log = logging.getLogger("ranray.data.loader")

READ_COLUMNS = ["key", "image", "label", "target", "landmarks", "flags"]

# Leading bytes of the encodings the decoders accept; anything else is bad input before any decoder
# sees it (a DALI decode error costs a pipeline rebuild, this check costs nothing).
IMAGE_MAGIC = {"jpeg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n"}


def looks_like_image(data: bytes | memoryview | np.ndarray | None) -> bool:
    if data is None or len(data) < 8:
        return False
    head = bytes(data[:8])
    return any(head.startswith(magic) for magic in IMAGE_MAGIC.values())


# ---------------------------------------------------------------------------------------------
# Index
# ---------------------------------------------------------------------------------------------


@dataclass
class Block:
    shard: int  # index into SplitIndex.paths
    row_group: int
    first_row: int  # row number of the group's first row inside its shard file (for messages)
    rows: np.ndarray  # selected row numbers inside the row group (int32)


@dataclass
class SplitIndex:
    paths: list[Path]
    blocks: list[Block]
    offsets: np.ndarray  # offsets[b] = global id of block b's first selected row; last = total
    bad_shards: list[str] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    def locate(self, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row ids -> (block number, position among the block's selected rows)."""
        block = np.searchsorted(self.offsets, gids, side="right") - 1
        return block, gids - self.offsets[block]

    def describe(self, gid: int) -> str:
        block, pos = self.locate(np.asarray([gid]))
        b = self.blocks[int(block[0])]
        row = b.first_row + int(b.rows[int(pos[0])])
        return f"{self.paths[b.shard]} row {row}"


def build_index(data_dir: str | Path, split: str, subset: str = "all") -> SplitIndex:
    """Index a split from shard metadata; an unreadable shard is logged, listed and left out."""
    if subset != "all" and subset not in SUBSET_FLAGS:
        raise ValueError(f"subset must be 'all' or one of {sorted(SUBSET_FLAGS)}, got {subset!r}")
    paths = shard_paths(data_dir, split)
    blocks: list[Block] = []
    bad: list[str] = []
    for shard, path in enumerate(paths):
        try:
            blocks.extend(_shard_blocks(shard, path, subset))
        except (OSError, pa.ArrowException) as exc:
            log.warning("unreadable shard %s skipped: %s", path, exc)
            bad.append(str(path))
    counts = np.array([len(b.rows) for b in blocks], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return SplitIndex(paths=paths, blocks=blocks, offsets=offsets, bad_shards=bad)


def _shard_blocks(shard: int, path: Path, subset: str) -> list[Block]:
    pf = pq.ParquetFile(path)
    meta = pf.metadata
    blocks, first = [], 0
    for rg in range(meta.num_row_groups):
        n = meta.row_group(rg).num_rows
        if subset == "all":
            rows = np.arange(n, dtype=np.int32)
        else:
            flags = pf.read_row_group(rg, columns=["flags"]).column("flags").to_numpy(zero_copy_only=False)
            rows = np.flatnonzero(flags & SUBSET_FLAGS[subset]).astype(np.int32)
        if len(rows):
            blocks.append(Block(shard=shard, row_group=rg, first_row=first, rows=rows))
        first += n
    return blocks


# ---------------------------------------------------------------------------------------------
# Orders and per-rank plans
# ---------------------------------------------------------------------------------------------


def epoch_order(index: SplitIndex, *, seed: int, epoch: int, shuffle: bool, window: int) -> np.ndarray:
    """All selected global row ids of the split in this epoch's order (deterministic in seed, epoch)."""
    if not shuffle:
        return np.arange(index.num_rows, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(index.blocks))
    pieces = []
    for start in range(0, len(perm), window):
        ids = np.concatenate([np.arange(index.offsets[b], index.offsets[b + 1]) for b in perm[start:start + window]])
        pieces.append(rng.permutation(ids))
    return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)


@dataclass
class RankPlan:
    """One rank's batches for one epoch: rows[bounds[i]:bounds[i + 1]] is batch i."""

    rows: np.ndarray
    bounds: np.ndarray
    padded: int = 0  # rows repeated to give every rank the same batch count (tiny splits only)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def batch(self, i: int) -> np.ndarray:
        return self.rows[self.bounds[i]:self.bounds[i + 1]]


def num_batches(total: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch on every rank (the same number on all of them)."""
    if drop_last:
        return (total // world_size) // batch_size
    return math.ceil(math.ceil(total / world_size) / batch_size) if total else 0


def plan_rank(order: np.ndarray, *, rank: int, world_size: int, batch_size: int, drop_last: bool) -> RankPlan:
    """Split an epoch order into this rank's batches; every rank gets `num_batches(...)` of them.

    drop_last: each rank takes a contiguous slice of total // world rows and uses whole batches of
    it, so fewer than world_size * batch_size rows go unused. Otherwise the slices differ by at most
    one row and batches are filled greedily while leaving at least one row for each later batch,
    so a rank with one row fewer still yields the same count (its batches are just smaller).
    """
    total = len(order)
    nb = num_batches(total, world_size, batch_size, drop_last)
    if drop_last:
        per = total // world_size
        rows = order[rank * per: rank * per + nb * batch_size]
        return RankPlan(rows=rows, bounds=np.arange(nb + 1, dtype=np.int64) * batch_size)
    base, extra = divmod(total, world_size)
    lo = rank * base + min(rank, extra)
    rows = order[lo: lo + base + (rank < extra)]
    padded = max(0, nb - len(rows))
    if padded:  # fewer rows than batches: only when total < world_size or batch_size == 1
        rows = np.concatenate([rows, np.resize(order, padded)])
    return RankPlan(rows=rows, bounds=_greedy_bounds(len(rows), nb, batch_size), padded=padded)


def _greedy_bounds(n: int, nb: int, batch_size: int) -> np.ndarray:
    bounds = [0]
    for i in range(nb):
        size = min(batch_size, n - bounds[-1] - (nb - i - 1))
        bounds.append(bounds[-1] + size)
    return np.asarray(bounds, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------


@dataclass
class Rows:
    """Decoded-free columns of some rows; `bad` lists (position, reason) of rows unusable as read."""

    gids: np.ndarray
    keys: list[str]
    images: list[np.ndarray]  # encoded bytes as uint8 arrays (what DALI's external_source takes)
    labels: np.ndarray  # int64
    targets: np.ndarray  # float32 (n, C); C = 0 when the shards carry no targets
    landmarks: np.ndarray  # float32 (n, 68, 2); NaN when the shards carry none
    flags: np.ndarray  # int32
    bad: list[tuple[int, str]]

    def select(self, keep: np.ndarray) -> "Rows":
        pick = [int(i) for i in keep]
        return Rows(gids=self.gids[keep], keys=[self.keys[i] for i in pick], images=[self.images[i] for i in pick],
                    labels=self.labels[keep], targets=self.targets[keep], landmarks=self.landmarks[keep],
                    flags=self.flags[keep], bad=[])


class BlockReader:
    """Reads row groups on demand and keeps the last few (one shuffle window) decoded in memory."""

    def __init__(self, index: SplitIndex, cache_blocks: int):
        self.index = index
        self.cache_blocks = max(1, cache_blocks)
        self._cache: OrderedDict[int, pa.Table | None] = OrderedDict()
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()

    def read(self, gids: np.ndarray) -> Rows:
        blocks, pos = self.index.locate(gids)
        order = np.argsort(blocks, kind="stable")
        parts, bad = [], []
        for b in np.unique(blocks):
            sel = order[blocks[order] == b]
            table = self._block(int(b))
            if table is None:
                bad += [(int(i), "unreadable row group") for i in sel]
                continue
            local = self.index.blocks[int(b)].rows[pos[sel]]
            parts.append((sel, table.take(pa.array(local))))
        return _assemble(gids, parts, bad)

    def _block(self, b: int) -> pa.Table | None:
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        blk = self.index.blocks[b]
        path = self.index.paths[blk.shard]
        try:
            table = self._file(blk.shard).read_row_group(blk.row_group, columns=READ_COLUMNS)
        except (OSError, pa.ArrowException) as exc:
            log.warning("unreadable row group %d of %s (rows %d..%d): %s", blk.row_group, path,
                        blk.first_row, blk.first_row + int(blk.rows.max()), exc)
            table = None  # remembered, so a broken group is reported once, not once per batch
        self._cache[b] = table
        while len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return table

    def _file(self, shard: int) -> pq.ParquetFile:
        if shard not in self._files:
            self._files[shard] = pq.ParquetFile(self.index.paths[shard])
            while len(self._files) > 16:  # bounded open handles for splits of thousands of shards
                self._files.popitem(last=False)
        return self._files[shard]


def _assemble(gids: np.ndarray, parts: list[tuple[np.ndarray, pa.Table]], bad: list[tuple[int, str]]) -> Rows:
    n = len(gids)
    keys: list[str] = [""] * n
    images: list[np.ndarray] = [np.zeros(0, np.uint8)] * n
    labels = np.full(n, -1, np.int64)
    flags = np.zeros(n, np.int32)
    landmarks = np.full((n, NUM_LANDMARKS, 2), np.nan, np.float32)
    target_parts = []
    for sel, table in parts:
        for i, key in zip(sel, table.column("key").to_pylist()):
            keys[i] = key
        for i, img in zip(sel, _binary_views(table.column("image"))):
            images[i] = img
        labels[sel] = table.column("label").to_numpy(zero_copy_only=False)
        flags[sel] = table.column("flags").to_numpy(zero_copy_only=False)
        lm = _fixed_lists(table.column("landmarks"), NUM_LANDMARKS * 2)
        if lm is not None:
            landmarks[sel] = lm.reshape(-1, NUM_LANDMARKS, 2)
        target_parts.append((sel, _fixed_lists(table.column("target"), None)))
    targets = _gather_targets(n, target_parts)
    unreadable = {i for i, _ in bad}
    bad = bad + [(i, "empty or non-image bytes") for i in range(n)
                 if i not in unreadable and not looks_like_image(images[i])]
    return Rows(gids=gids, keys=keys, images=images, labels=labels, targets=targets,
                landmarks=landmarks, flags=flags, bad=bad)


def _binary_views(column: pa.ChunkedArray) -> list[np.ndarray]:
    """Per-row uint8 views into the Arrow buffer: no per-image copy."""
    out = []
    for chunk in column.chunks:
        if chunk.null_count:
            out += [np.frombuffer(v, np.uint8) if v is not None else np.zeros(0, np.uint8)
                    for v in chunk.to_pylist()]
            continue
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, np.int32)[chunk.offset: chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buf, np.uint8)
        out += [data[offsets[j]:offsets[j + 1]] for j in range(len(chunk))]
    return out


def _fixed_lists(column: pa.ChunkedArray, width: int | None) -> np.ndarray | None:
    """A list<float> column as (n, width) float32, or None when its rows are empty or ragged."""
    arr = column.combine_chunks()
    lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
    if len(lengths) == 0 or lengths.min() != lengths.max() or lengths[0] == 0:
        return None
    if width is not None and lengths[0] != width:
        return None
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(arr), int(lengths[0]))


def _gather_targets(n: int, parts: list[tuple[np.ndarray, np.ndarray | None]]) -> np.ndarray:
    widths = {t.shape[1] for _, t in parts if t is not None}
    if len(widths) != 1 or any(t is None for _, t in parts):
        return np.zeros((n, 0), np.float32)
    targets = np.zeros((n, widths.pop()), np.float32)
    for sel, t in parts:
        targets[sel] = t
    return targets


def ensure_split(index: SplitIndex, data_dir: str | Path, split: str) -> None:
    if not index.blocks and index.bad_shards:
        raise DatasetError(f"{data_dir}: every shard of split '{split}' is unreadable")


# ---------------------------------------------------------------------------------------------
# Write side: prepare's workers write their blocks' shards, rejects and commit markers
# ---------------------------------------------------------------------------------------------

ROW_GROUP_ROWS = 256  # the loader shuffles whole row groups; 256 faces is ~1.5 MB of JPEG
MARKERS = "blocks"  # <task>.json: a task's statistics, written last: the task is committed
REJECT_PARTS = "rejects"  # <task>.parquet: a task's rejects, merged into rejects.parquet at the end


class OutputLocation:
    """A folder on a pyarrow filesystem: a local path, or a URI such as s3://bucket/dataset.

    Writes are atomic where the filesystem renames (local: temp file + rename); an object store's
    PUT is atomic by itself. Paths are relative to the folder, with "/" separators.
    """

    def __init__(self, where: str):
        import pyarrow.fs as pafs

        if "://" in where:
            self.fs, self.root = pafs.FileSystem.from_uri(where)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(where).absolute())
        self.where = where
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __reduce__(self):
        return OutputLocation, (self.where,)

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def files(self, rel: str = "") -> list[str]:
        """Files under rel (recursive), relative to this folder, sorted."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True))
        start = len(self.root) + 1
        return sorted(i.path[start:] for i in infos if i.type == pafs.FileType.File)

    def mkdir(self, rel: str = "") -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._atomic(rel, lambda target: self._put(target, data))

    def write_table(self, rel: str, table: pa.Table) -> None:
        self._atomic(rel, lambda target: pq.write_table(table, target, filesystem=self.fs,
                                                        row_group_size=ROW_GROUP_ROWS))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_table(self, rel: str) -> pa.Table:
        return pq.read_table(self.path(rel), filesystem=self.fs)

    def delete(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))

    def delete_dir(self, rel: str = "") -> None:
        if self.exists(rel):
            self.fs.delete_dir(self.path(rel))

    def _put(self, target: str, data: bytes) -> None:
        with self.fs.open_output_stream(target) as f:
            f.write(data)

    def _atomic(self, rel: str, write) -> None:
        target = self.path(rel)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if not self.local:
            write(target)
            return
        tmp = f"{target}.tmp-{os.getpid()}"
        write(tmp)
        self.fs.move(tmp, target)


def shard_name(split: str, task: str) -> str:
    return f"{split}/part-{task}.parquet"


def write_task_output(out: OutputLocation, task: str, shards: dict[str, pa.Table], rejects: pa.Table,
                      stats: dict) -> dict:
    """A task's shards (one per split), its rejects, then its marker: the marker commits the task."""
    files = {}
    for split, table in sorted(shards.items()):
        files[split] = shard_name(split, task)
        out.write_table(files[split], table)
    stats = dict(stats, files=files, rejects_file="")
    if rejects.num_rows:
        stats["rejects_file"] = f"{REJECT_PARTS}/{task}.parquet"
        out.write_table(stats["rejects_file"], rejects)
    out.write_bytes(f"{MARKERS}/{task}.json", json.dumps(stats).encode())
    return stats


MARKER_INDEX = ("name", "block", "lo", "hi", "lines", "files", "rejects_file")  # what tracking a run needs


def read_markers(out: OutputLocation, keys: tuple[str, ...] | None = MARKER_INDEX) -> dict[str, dict]:
    """Committed tasks: task name -> its statistics (only `keys` of them; None: all). The full
    statistics carry per-block label lists: read_marker them one at a time."""
    markers = {}
    for rel in out.files(MARKERS):
        if rel.endswith(".json"):
            stats = json.loads(out.read_bytes(rel))
            markers[stats["name"]] = stats if keys is None else {k: stats[k] for k in keys}
    return markers


def read_marker(out: OutputLocation, task: str) -> dict:
    return json.loads(out.read_bytes(f"{MARKERS}/{task}.json"))
