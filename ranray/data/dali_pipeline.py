"""The DALI half of the loader: decode and augment host batches, CPU-only or on a GPU.

Python (ranray.data.loader) reads rows and draws every random parameter; DALI gets them per sample
through one batch-mode external_source and runs decode -> warp_affine (flip, rotation, scale) ->
gaussian_blur (a conditional: drawn samples only) -> erase -> color_twist -> crop_mirror_normalize.
Drawing in Python keeps the landmarks, the torch path and a resumed run consistent with the
pixels; DALI's own random ops would be invisible to the landmark transform.

Device: `device.type == "cuda"` builds a "mixed" decoder (nvJPEG, CUDA outputs on that device) and
GPU operators after it; anything else builds a CPU-only pipeline with device_id=None, which needs
no CUDA at all. Per-sample parameters stay CPU tensors (DALI's argument inputs are CPU-only).

The external_source callback runs in the thread that calls `run()`, while DALI's threads decode the
batches already queued, so reading Parquet overlaps decoding. A parallel (process) external_source
was not used: the callback only slices cached row groups (cheap), and worker processes would each
re-read the same row groups.

Errors: when DALI rejects a batch (an image passed the magic-byte check but does not decode, or is
not FACE_SIZE square), that batch is handed to `fallback` (the torch path, which finds and drops the
bad rows) and, if the pipeline itself failed, a new pipeline continues from the next batch.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray

from ranray.data.augment import HostBatch
from ranray.data.schema import FACE_SIZE, PIXEL_MEAN, PIXEL_STD

log = logging.getLogger("ranray.data.loader")

FACE_SHAPE = (FACE_SIZE, FACE_SIZE, 3)


@dataclass(frozen=True)
class DaliSpec:
    batch_size: int
    num_threads: int
    device: torch.device
    augment: bool
    channels_last: bool
    seed: int = 0
    prefetch: int = 2

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def device_id(self) -> int | None:
        if not self.gpu:
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()


def _augment_inputs(host: HostBatch) -> tuple[np.ndarray, ...]:
    """Per-sample argument inputs, in the order `_augment_graph` unpacks them.

    Each is one dense array with the batch as its first axis: external_source then takes it in one
    call instead of checking a Python list sample by sample (that cost ~1.5 ms per input and batch).
    """
    p = host.params
    return (
        p.inverse_matrices(),
        np.ascontiguousarray(p.blur_sigma), p.blur_sigma > 0,
        np.ascontiguousarray(p.erase_box[:, :2]), np.ascontiguousarray(p.erase_box[:, 2:]),
        np.ascontiguousarray(p.erase_fill),
        p.brightness, p.contrast, p.saturation,
    )


def _augment_graph(images, inputs):
    """warp -> blur (only where drawn) -> erase -> colour, as loader._augment_torch.

    The order and types were chosen by measured CPU cost per 112 px face (DALI 2.4, 1 thread):
    colour last with a float output costs ~0.2 ms against ~0.5 ms for uint8, and a conditional blur
    touches only the ~10% of samples drawn for it instead of all (~0.4 ms).
    """
    mtx, sigma, blur, anchor, shape, fill, bright, contrast, sat = inputs
    images = fn.warp_affine(images, matrix=mtx, size=FACE_SHAPE[:2])  # no fill_value: borders repeat
    if blur:
        images = fn.gaussian_blur(images, sigma=sigma)
    images = fn.erase(images, anchor=anchor, shape=shape, axis_names="HW", fill_value=fill)
    return fn.color_twist(images, brightness=bright, contrast=contrast, saturation=sat, dtype=types.FLOAT)


class _Feeder:
    """The external_source callback: next host batch -> DALI inputs; remembers what is in flight."""

    def __init__(self, batches: Iterator[HostBatch], augment: bool):
        self.batches = batches
        self.augment = augment
        self.in_flight: deque[HostBatch] = deque()
        self.error: BaseException | None = None

    def __call__(self):
        try:
            host = next(self.batches)
        except StopIteration:  # the end of the epoch, not an error
            raise
        except Exception as exc:  # our own failure, not DALI's: re-raised as is by the runner
            self.error = exc
            raise
        self.in_flight.append(host)
        encoded = list(host.rows.images)
        return (encoded, *_augment_inputs(host)) if self.augment else (encoded,)


class DaliRunner:
    """Runs host batches through a DALI pipeline; `fallback(i)` redoes batch i on the torch path."""

    def __init__(self, spec: DaliSpec, fallback: Callable[[int], tuple[HostBatch, torch.Tensor]]):
        self.spec = spec
        self.fallback = fallback

    def build(self, feeder: _Feeder) -> Pipeline:
        s = self.spec

        @pipeline_def(enable_conditionals=s.augment)
        def graph():
            inputs = fn.external_source(source=feeder, num_outputs=10 if s.augment else 1, batch=True)
            decoded = fn.decoders.image(inputs[0], device="mixed" if s.gpu else "cpu", output_type=types.RGB)
            images = _augment_graph(decoded, inputs[1:]) if s.augment else decoded
            images = fn.crop_mirror_normalize(
                images, crop=FACE_SHAPE[:2], out_of_bounds_policy="pad", mean=PIXEL_MEAN, std=PIXEL_STD,
                dtype=types.FLOAT, output_layout="HWC" if s.channels_last else "CHW")
            return images, decoded.shape(device="cpu")

        pipe = graph(batch_size=s.batch_size, num_threads=s.num_threads, device_id=s.device_id,
                     prefetch_queue_depth=s.prefetch, seed=s.seed)
        pipe.build()
        return pipe

    def run(self, batches: Iterable[HostBatch]) -> Iterator[tuple[HostBatch, torch.Tensor]]:
        """(host batch, images on the device) for every batch, in order, DALI failures redone by fallback."""
        remaining: Iterator[HostBatch] = iter(batches)
        while True:
            feeder = _Feeder(remaining, self.spec.augment)
            pipe = self.build(feeder)
            try:
                failed = yield from self._drain(pipe, feeder)
            finally:
                del pipe
            if failed is None:
                return
            yield self.fallback(failed.index)
            remaining = chain(list(feeder.in_flight), remaining)

    def _drain(self, pipe: Pipeline, feeder: _Feeder):
        """Yield outputs until the data ends (returns None) or the pipeline fails (returns that batch)."""
        while True:
            try:
                images, shapes = pipe.run()
            except StopIteration:
                return None
            except RuntimeError as exc:
                if feeder.error is not None:
                    raise feeder.error
                failed = feeder.in_flight.popleft()
                # shown, so a systematic DALI problem (not one bad image) does not pass unnoticed
                log.warning("DALI failed on batch %d, redone on the torch path: %s", failed.index,
                            _dali_cause(exc))
                return failed
            host = feeder.in_flight.popleft()
            if any(tuple(np.asarray(s)) != FACE_SHAPE for s in shapes):
                yield self.fallback(host.index)  # a wrong-sized face: the torch path drops it, counted
                continue
            yield host, self._to_torch(images)

    def _to_torch(self, images) -> torch.Tensor:
        dense = images.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device=self.spec.device if self.spec.gpu else "cpu")
        # no stream given: a blocking copy, done before DALI may recycle its output buffer on the next
        # run (a stream-ordered copy would race that); a device-to-device copy of one batch is tiny
        feed_ndarray(dense, out)
        return out.permute(0, 3, 1, 2) if self.spec.channels_last else out


def _dali_cause(exc: BaseException) -> str:
    """DALI's multi-line error as "operator: cause" (the lines after "encountered:")."""
    text = str(exc)
    op = next((ln.split("`")[1] for ln in text.splitlines() if ln.startswith("Error in") and "`" in ln), "DALI")
    tail = text.split("encountered:", 1)[-1].splitlines()
    cause = next((ln.strip() for ln in tail if ln.strip() and "no longer valid" not in ln), type(exc).__name__)
    return f"{op}: {cause[:200]}"
