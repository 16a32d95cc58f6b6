"""Per-rank face batches from a prepared split: DALI (CPU or GPU) or torch, one contract.

`build_loader(...)` -> `FaceLoader`; see docs/ARCHITECTURE.md ("Loader"). What the two backends share
lives here or below it: the epoch plan (ranray.data.shards), the per-sample augmentation parameters
and the landmark transform (ranray.data.augment), bad-input handling and the output dict. DALI only decodes and applies the
pixel operations (ranray.data.dali_pipeline); the torch path does the same with PIL and torch ops.

Geometry: one affine per sample (flip, rotation, scale about the face centre) warps the image and
moves the landmarks, so they always agree. Coordinates: images use DALI's/torch's continuous
convention (pixel i covers [i, i + 1)); landmarks are pixel indices (dlib's convention), so a flip
maps x to FACE_SIZE - 1 - x, and the 68-point left/right indices swap with FLIP_68.

Bad input: a row whose row group cannot be read, whose bytes are no image, that does not decode or
is not FACE_SIZE x FACE_SIZE RGB is logged with file and row, counted in `skipped` and left out of
its batch; the batch count never changes, so ranks stay in step. A batch left empty gets one
replacement row: the next row of this rank's plan that decodes (a duplicate, visible in `keys`).
Under DALI, a batch the DALI decoder rejects is redone on the torch path and the pipeline rebuilt.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ranray.config import AugmentConfig
from ranray.data.augment import AugmentParams, HostBatch, sample_augment, transform_landmarks
from ranray.data.schema import FACE_SIZE, SUBSETS, normalize, read_manifest
from ranray.data.shards import (BlockReader, RankPlan, Rows, SplitIndex, build_index, ensure_split,
                                epoch_order, num_batches, plan_rank)

log = logging.getLogger("ranray.data.loader")

LUMA = (0.299, 0.587, 0.114)  # the weights DALI's color_twist desaturates with (measured)
CONTRAST_PIVOT = 128.0  # DALI's color_twist contrast centre for uint8 images (measured)
SHUFFLE_WINDOW = 8  # row groups mixed together per shuffle window (and cached per rank)


@dataclass
class BatchSource:
    """Builds the batches of one rank's epoch; picklable, so torch DataLoader workers can hold one."""

    index: SplitIndex
    plan: RankPlan
    augment: AugmentConfig | None
    seed: int
    epoch: int
    rank: int
    segment: int = 0  # how many world-size changes this epoch has been re-planned after
    _reader: BlockReader | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}  # each process opens its own files

    @property
    def reader(self) -> BlockReader:
        if self._reader is None:
            self._reader = BlockReader(self.index, cache_blocks=SHUFFLE_WINDOW + 1)
        return self._reader

    def load(self, i: int, decode: bool) -> HostBatch:
        """Batch i: read, draw augmentation, drop bad rows (decoding them with PIL if `decode`)."""
        gids = self.plan.batch(i)
        rows = self.reader.read(gids)
        params = self._params(i, len(gids))
        bad = dict(rows.bad)
        pixels = decode_rows(rows, bad) if decode else None
        skipped = [f"{self.index.describe(int(gids[p]))} ({rows.keys[p]}): {why}" for p, why in sorted(bad.items())]
        keep = np.array([p for p in range(len(gids)) if p not in bad], dtype=np.int64)
        if len(keep) == 0:
            return replace(self._replacement(i, params, decode), skipped=skipped)
        rows = rows.select(keep)
        params = params.select(keep) if params is not None else None
        pixels = pixels[keep] if pixels is not None else None
        return HostBatch(index=i, rows=_with_landmarks(rows, params), params=params, pixels=pixels, skipped=skipped)

    def _params(self, i: int, n: int) -> AugmentParams | None:
        if self.augment is None:
            return None
        # A re-planned rest of the epoch (segment > 0) draws its own streams, not segment 0's again.
        key = [self.seed, self.epoch, self.rank, i] + ([self.segment] if self.segment else [])
        return sample_augment(self.augment, n, np.random.default_rng(key))

    def _replacement(self, i: int, params: AugmentParams | None, decode: bool) -> HostBatch:
        """The first row after batch i (wrapping) in this rank's plan that decodes, as a batch of one."""
        rows_all = self.plan.rows
        start = int(self.plan.bounds[i + 1])
        for gid in np.concatenate([rows_all[start:], rows_all[:start]]):
            rows = self.reader.read(np.asarray([gid]))
            bad: dict[int, str] = dict(rows.bad)
            pixels = decode_rows(rows, bad)
            if not bad:
                one = params.select(np.array([0])) if params is not None else None
                return HostBatch(index=i, rows=_with_landmarks(rows, one), params=one,
                                 pixels=pixels if decode else None)
        raise RuntimeError(f"no row of rank {self.rank}'s share of {self.index.paths[0].parent} decodes; "
                           "the prepared split is unusable")


def _with_landmarks(rows: Rows, params: AugmentParams | None) -> Rows:
    if params is not None:
        rows.landmarks = transform_landmarks(rows.landmarks, params)
    return rows


def decode_rows(rows: Rows, bad: dict[int, str]) -> np.ndarray:
    """PIL-decode every row not already bad into (n, S, S, 3) uint8; failures are added to `bad`."""
    out = np.zeros((len(rows.images), FACE_SIZE, FACE_SIZE, 3), np.uint8)
    for p, data in enumerate(rows.images):
        if p in bad:
            continue
        try:
            with Image.open(io.BytesIO(data.tobytes())) as img:
                arr = np.asarray(img.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            bad[p] = f"does not decode ({exc})"
            continue
        if arr.shape != out.shape[1:]:
            bad[p] = f"is {arr.shape[1]}x{arr.shape[0]}, not {FACE_SIZE}x{FACE_SIZE}"
            continue
        out[p] = arr
    return out


# ---------------------------------------------------------------------------------------------
# Torch pixel path (also DALI's fallback for a batch its decoder rejects)
# ---------------------------------------------------------------------------------------------


def torch_pixels(host: HostBatch) -> torch.Tensor:
    """(n, 3, S, S) float32 normalised, from host-decoded pixels, with the batch's augmentation."""
    x = torch.from_numpy(host.pixels).permute(0, 3, 1, 2).float()
    if host.params is not None:
        x = _augment_torch(x, host.params)
    return normalize(x, inplace=True)


def _augment_torch(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """The DALI graph's operations, in its order: warp, blur, erase, colour (0..255 scale, float)."""
    grid = F.affine_grid(p.grid_theta(), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    for i in np.flatnonzero(p.blur_sigma > 0):
        x[i] = _blur(x[i], float(p.blur_sigma[i]))
    for i in np.flatnonzero(p.erase_box[:, 2] > 0):
        y0, x0, h, w = (int(v) for v in p.erase_box[i])
        x[i, :, y0:y0 + h, x0:x0 + w] = torch.from_numpy(p.erase_fill[i])[:, None, None]
    return _colour(x, p)


def _colour(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """DALI color_twist's linear map: desaturate towards luma, contrast about 128, brightness.

    Folded into one 3x3 matrix and offset per sample: a single batched matmul over the pixels. Not
    clamped, like DALI's float output: jittered values may leave 0..255 (so [-1, 1] once normalised)
    by up to the brightness and contrast factors.
    """
    s, c, b = (torch.from_numpy(a).view(-1, 1, 1) for a in (p.saturation, p.contrast, p.brightness))
    towards_luma = torch.ones(3, 1) * torch.tensor([LUMA])  # every row = luma weights
    matrix = b * c * (s * torch.eye(3) + (1 - s) * towards_luma)
    offset = b * (1 - c) * CONTRAST_PIVOT
    n, ch, h, w = x.shape
    out = torch.baddbmm(offset.view(n, 1, 1).expand(n, ch, 1), matrix, x.reshape(n, ch, h * w))
    return out.view(n, ch, h, w)


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian, radius ceil(3 sigma) as DALI's gaussian_blur, mirrored borders."""
    radius = math.ceil(3 * sigma)
    d = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-d ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    y = F.pad(img[None], (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k, groups=3)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(y, k.transpose(2, 3), groups=3)[0]


class _TorchBatches(torch.utils.data.Dataset):
    """Item i = the whole batch i (decoded and augmented in a DataLoader worker)."""

    def __init__(self, source: BatchSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source.plan)

    def __getitem__(self, i: int) -> tuple[HostBatch, torch.Tensor]:
        host = self.source.load(i, decode=True)
        images = torch_pixels(host)
        host.pixels, host.rows.images = None, []  # nothing bulky goes back through the worker queue
        return host, images


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # one core per worker, as DALI's num_threads counts cores


def _iter_torch(loader: "FaceLoader", source: BatchSource, start: int) -> Iterator[tuple[HostBatch, torch.Tensor]]:
    workers = max(0, loader.spec.num_threads)
    dl = torch.utils.data.DataLoader(
        _TorchBatches(source), batch_size=None, sampler=range(start, len(source.plan)), num_workers=workers,
        worker_init_fn=_one_thread if workers else None, prefetch_factor=2 if workers else None,
        pin_memory=loader.spec.device.type == "cuda")
    yield from dl


def _iter_dali(loader: "FaceLoader", source: BatchSource, start: int) -> Iterator[tuple[HostBatch, torch.Tensor]]:
    from ranray.data.dali_pipeline import DaliRunner, DaliSpec  # DALI's import costs ~1 s; torch users skip it

    spec = DaliSpec(batch_size=loader.spec.batch_size, num_threads=max(1, loader.spec.num_threads),
                    device=loader.spec.device, augment=source.augment is not None,
                    channels_last=loader.spec.channels_last, seed=source.seed)

    def fallback(i: int) -> tuple[HostBatch, torch.Tensor]:
        host = source.load(i, decode=True)
        return host, torch_pixels(host)

    batches = (source.load(i, decode=False) for i in range(start, len(source.plan)))
    yield from DaliRunner(spec, fallback).run(batches)


BACKENDS: dict[str, Callable[["FaceLoader", BatchSource, int], Iterator[tuple[HostBatch, torch.Tensor]]]] = {
    "dali": _iter_dali,
    "torch": _iter_torch,
}


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoaderSpec:
    data_dir: Path
    split: str
    batch_size: int
    rank: int
    world_size: int
    training: bool
    augment: AugmentConfig | None  # None: no augmentation (evaluation, or disabled)
    backend: str
    device: torch.device
    num_threads: int
    channels_last: bool
    subset: str
    drop_last: bool

    def validate(self) -> None:
        checks = {
            "batch_size must be >= 1": self.batch_size >= 1,
            "world_size must be >= 1 and 0 <= rank < world_size": 0 <= self.rank < self.world_size,
            f"backend must be one of {sorted(BACKENDS)}": self.backend in BACKENDS,
            f"subset must be one of {list(SUBSETS)}": self.subset in SUBSETS,
            "augment needs 0 < scale_min <= scale_max": self.augment is None
            or 0 < self.augment.scale_min <= self.augment.scale_max,
        }
        failed = [why for why, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"build_loader: {'; '.join(failed)}")


@dataclass(frozen=True)
class Segment:
    """A stretch of an epoch run on one world size: `batches` steps of its plan were taken."""

    world_size: int
    batch_size: int
    drop_last: bool
    batches: int

    def as_list(self) -> list[Any]:
        return [self.world_size, self.batch_size, self.drop_last, self.batches]


def plan_segment(order: np.ndarray, rank: int, world_size: int, batch_size: int, drop_last: bool,
                 replanned: bool) -> RankPlan:
    """This rank's plan of `order`. The rest of an epoch re-planned after a world-size change drops
    nothing (each of its rows once) and spreads each rank's rows evenly over its batches (sizes
    differ by at most one, so no lone row beside full batches: BatchNorm needs two), while the batch
    count stays the same on every rank."""
    if not replanned:
        return plan_rank(order, rank=rank, world_size=world_size, batch_size=batch_size, drop_last=drop_last)
    plan = plan_rank(order, rank=rank, world_size=world_size, batch_size=batch_size, drop_last=False)
    bounds = np.round(np.linspace(0, len(plan.rows), len(plan) + 1)).astype(np.int64)
    return RankPlan(rows=plan.rows, bounds=bounds, padded=plan.padded)


def remaining_order(order: np.ndarray, segments: list[Segment]) -> np.ndarray:
    """The rows of an epoch's `order` that its finished segments did not consume, in order.

    Segment k planned what segment k-1 left, over its own world size; the rows it consumed are the
    first `batches` batches of every one of its ranks.
    """
    for k, seg in enumerate(segments):
        used = [plan_segment(order, r, seg.world_size, seg.batch_size, seg.drop_last, k > 0)
                for r in range(seg.world_size)]
        consumed = np.concatenate([p.rows[: p.bounds[seg.batches]] for p in used])
        order = order[~np.isin(order, consumed)]
    return order


class FaceLoader:
    """Batches of one rank, one epoch at a time; see the module docstring and ARCHITECTURE.md.

    Position: iterating hands out the current epoch's batches from the first one not yet handed
    out (0 after `set_epoch` to another epoch); an epoch iterated to its end starts over when
    iterated again. `state_dict()` records (epoch, batches handed out, seed) and the epoch's
    segments: a resume on another world size re-plans the rows the epoch has not used yet over the
    new ranks (`remaining_order`), so each row of the epoch is still used once.
    """

    def __init__(self, spec: LoaderSpec, index: SplitIndex, seed: int):
        self.spec = spec
        self.index = index
        self.seed = seed
        self.epoch = 0
        self.skipped = 0
        self._consumed = 0  # batches handed out in the current segment of the epoch
        self._segments: list[Segment] = []  # the epoch's earlier stretches on other world sizes
        self._rows_left: tuple[tuple[Any, ...], int] | None = None  # (key, rows the segment plans): cached

    def __len__(self) -> int:
        """Batches of the current segment (the whole epoch unless it was re-planned)."""
        s = self.spec
        return num_batches(self._segment_rows(), s.world_size, s.batch_size, s.drop_last and not self._segments)

    def full_epoch_batches(self) -> int:
        """Batches of a whole epoch on this world size: the LR schedule's unit."""
        s = self.spec
        return num_batches(self.index.num_rows, s.world_size, s.batch_size, s.drop_last)

    def epoch_progress(self) -> float:
        """The fraction of the epoch done: batches handed out / batches, or after a world-size change
        the fraction of the epoch's rows used (over every rank and segment)."""
        if self._consumed >= len(self):
            return 1.0
        if not self._segments:
            return self._consumed / len(self)
        s, total = self.spec, max(1, self.index.num_rows)
        done = total - self._segment_rows()
        return min(1.0, (done + self._consumed * s.world_size * s.batch_size) / total)

    def epoch_finished(self) -> bool:
        return self._consumed >= len(self)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` at its first batch; the current epoch again keeps a restored position."""
        if epoch != self.epoch:
            self.epoch, self._consumed, self._segments = epoch, 0, []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._consumed >= len(self):  # a finished epoch iterated again: the whole epoch, afresh
            self._consumed, self._segments = 0, []
        start = self._consumed
        source = self._source()
        epoch_skipped = 0
        for host, images in BACKENDS[self.spec.backend](self, source, start):
            epoch_skipped += self._report(host)
            self._consumed += 1
            yield self._output(host, images)
        if epoch_skipped:
            log.warning("rank %d epoch %d: %d bad images skipped (%d in total)", self.spec.rank, self.epoch,
                        epoch_skipped, self.skipped)

    def state_dict(self) -> dict[str, Any]:
        s = self.spec
        return {"epoch": self.epoch, "batches": self._consumed, "seed": self.seed, "skipped": self.skipped,
                "world_size": s.world_size, "batch_size": s.batch_size, "drop_last": s.drop_last,
                "segments": [seg.as_list() for seg in self._segments],
                "position": self.index.num_rows - self._segment_rows()
                + min(self._segment_rows(), self._consumed * s.world_size * s.batch_size),
                "epoch_rows": self.index.num_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state` was taken: the next iteration starts at its next batch.

        With the same world size, batch size and drop_last the remaining batches are exactly the
        unseen ones. Otherwise the stretch the state was taken in becomes a finished segment and
        the rows the epoch has not used are re-planned over this world size: each once.
        """
        s = self.spec
        self.seed, self.epoch, self.skipped = int(state["seed"]), int(state["epoch"]), int(state.get("skipped", 0))
        self._segments = [Segment(int(w), int(b), bool(d), int(n)) for w, b, d, n in state.get("segments", [])]
        batches = int(state["batches"])
        saved = Segment(int(state["world_size"]), int(state["batch_size"]), bool(state["drop_last"]), batches)
        if (saved.world_size, saved.batch_size, saved.drop_last) != (s.world_size, s.batch_size, s.drop_last):
            if batches:
                self._segments.append(saved)
            batches = 0
            log.info("rank %d: epoch %d re-planned over %d workers: %d of its %d rows left", s.rank, self.epoch,
                     s.world_size, self._segment_rows(), self.index.num_rows)
        self._consumed = batches

    def _segment_rows(self) -> int:
        """Rows the current segment plans: the epoch's, less what the earlier segments used."""
        if not self._segments:
            return self.index.num_rows
        key = (self.epoch, self.seed, tuple(self._segments))
        if self._rows_left is None or self._rows_left[0] != key:
            self._rows_left = (key, len(self._order()))
        return self._rows_left[1]

    def _order(self) -> np.ndarray:
        s = self.spec
        order = epoch_order(self.index, seed=self.seed, epoch=self.epoch, shuffle=s.training, window=SHUFFLE_WINDOW)
        return remaining_order(order, self._segments)

    # -- internals ---------------------------------------------------------------------------

    def _source(self) -> BatchSource:
        s = self.spec
        plan = plan_segment(self._order(), s.rank, s.world_size, s.batch_size, s.drop_last, bool(self._segments))
        if plan.padded:
            log.warning("split '%s' has %d rows for %d ranks: rank %d repeats %d rows to keep batch counts equal",
                        s.split, self.index.num_rows, s.world_size, s.rank, plan.padded)
        return BatchSource(index=self.index, plan=plan, augment=s.augment, seed=self.seed, epoch=self.epoch,
                           rank=s.rank, segment=len(self._segments))

    def _report(self, host: HostBatch) -> int:
        for line in host.skipped:
            log.warning("bad image skipped: %s", line)
        self.skipped += len(host.skipped)
        return len(host.skipped)

    def _output(self, host: HostBatch, images: torch.Tensor) -> dict[str, Any]:
        dev = self.spec.device
        blocking = dev.type != "cuda"
        images = images.to(dev, non_blocking=not blocking)
        if self.spec.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        rows = host.rows
        return {
            "images": images,
            "labels": torch.from_numpy(rows.labels).to(dev, non_blocking=not blocking),
            "targets": torch.from_numpy(rows.targets).to(dev, non_blocking=not blocking),
            "landmarks": torch.from_numpy(rows.landmarks).to(dev, non_blocking=not blocking),
            "flags": torch.from_numpy(rows.flags).to(dev, non_blocking=not blocking),
            "keys": list(rows.keys),
        }


def build_loader(data_dir: str | Path, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, training: bool = False, augment: AugmentConfig | None = None,
                 backend: str = "dali", device: torch.device | str = torch.device("cpu"), num_threads: int = 2,
                 channels_last: bool = False, subset: str = "all", drop_last: bool | None = None) -> FaceLoader:
    """A resumable loader of `split` for this rank (see ARCHITECTURE.md "Loader").

    training: shuffle per epoch and augment; evaluation reads in stored order, unaugmented.
    augment: used only when training; None means AugmentConfig()'s defaults, `enabled=False` none.
    num_threads: DALI's CPU threads, or the torch path's DataLoader worker processes.
    drop_last: None means `training`.
    """
    read_manifest(data_dir)  # a clear error for a directory that is not a prepared dataset
    aug = (augment if augment is not None else AugmentConfig()) if training else None
    spec = LoaderSpec(
        data_dir=Path(data_dir), split=split, batch_size=batch_size, rank=rank, world_size=world_size,
        training=training, augment=aug if aug is not None and aug.enabled else None, backend=backend,
        device=torch.device(device), num_threads=num_threads, channels_last=channels_last, subset=subset,
        drop_last=training if drop_last is None else drop_last)
    spec.validate()
    index = build_index(data_dir, split, subset)
    ensure_split(index, data_dir, split)
    return FaceLoader(spec, index, seed)
