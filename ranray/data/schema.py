"""The prepared-dataset contract shared by `prepare` (writer) and the loaders (readers).

A prepared dataset is a directory:
    manifest.json              schema version, counts per split and class, rejects by reason, config
    <split>/part-NNNNN.parquet shards with SHARD_SCHEMA
    rejects.parquet            REJECT_SCHEMA: every input row that was not written, with its reason
Invariant (checked by prepare, stored in the manifest): rows_in == rows_written + rows_rejected.

Pixels: every reader hands the model (pixel - PIXEL_MEAN) / PIXEL_STD, 0..255 -> [-1, 1]: the torch
loader and prediction through `normalize`, the DALI pipeline through crop_mirror_normalize's mean and
std; `denormalize` turns such tensors back into uint8 pixels for display.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
FACE_SIZE = 112
NUM_LANDMARKS = 68
NUM_VOTES = 10  # FERPlus: 8 emotions + unknown + NF

# Pixel normalisation of every model input (see `normalize`). PIXEL_STD is a divisor, not a factor:
# x / PIXEL_STD and x * (1 / PIXEL_STD) differ in the last bit for some pixels; the loaders divide.
PIXEL_MEAN = 127.5
PIXEL_STD = 127.5

# Row flags (a bitmask), so evaluation can report the RAN paper's subsets separately.
FLAG_OCCLUSION = 1
FLAG_POSE30 = 2
FLAG_POSE45 = 4
SUBSET_FLAGS = {"occlusion": FLAG_OCCLUSION, "pose30": FLAG_POSE30, "pose45": FLAG_POSE45}
SUBSETS = ("all", *SUBSET_FLAGS)  # what a loader, an evaluation or a comparison can select
SUBSET_MASK = sum(SUBSET_FLAGS.values())  # "clean" rows have none of these flags
# Set by prepare (detector "given") when the landmark fit failed its plausibility check and the
# face was aligned from its box instead (see ranray/data/align.py); such rows are kept, not dropped.
FLAG_ALIGN_FALLBACK = 8

SHARD_SCHEMA = pa.schema([
    ("key", pa.string()),  # unique source key (file name or csv row), for rejects and pairs files
    ("image", pa.binary()),  # JPEG of the aligned FACE_SIZE x FACE_SIZE RGB face
    ("label", pa.int32()),  # class index (expressions) or identity index (pretraining); -1: none
    ("target", pa.list_(pa.float32())),  # per-class target distribution by the label mode
    ("votes", pa.list_(pa.int16())),  # raw FERPlus votes (NUM_VOTES) or empty
    ("landmarks", pa.list_(pa.float32())),  # 68 (x, y) pairs in aligned pixel coordinates, flat
    ("split", pa.string()),
    ("flags", pa.int32()),
    ("source", pa.string()),
])

REJECT_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source", pa.string()),
    ("split", pa.string()),
    ("reason", pa.string()),  # short machine-readable reason, e.g. "no_face", "corrupt_image"
    ("detail", pa.string()),  # human-readable detail: file, row, exception text
])


class DatasetError(RuntimeError):
    """A prepared dataset is missing, incomplete or of another schema version."""


SYNTH_MARKER = "synth.json"  # ranray.data.synth writes it at the root of every synthetic dataset


def synthetic_inputs(inputs: list[str]) -> bool:
    """Whether prepare's inputs come from ranray.data.synth: each is a folder it wrote (holding the
    marker) or a file in one (its fer2013.csv pair, say)."""
    folders = [Path(p) if Path(p).is_dir() else Path(p).parent for p in inputs]
    return bool(inputs) and all((f / SYNTH_MARKER).is_file() for f in folders)


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DatasetError(f"{data_dir} is not a prepared dataset (no manifest.json); run `ranray prepare`")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(
            f"{path}: schema_version {manifest.get('schema_version')} != {SCHEMA_VERSION}; re-run `ranray prepare`")
    return manifest


def shard_paths(data_dir: str | Path, split: str) -> list[Path]:
    """The shards of `split`; "train+val" joins splits (the RAN protocol trains on both)."""
    paths = []
    for part in split.split("+"):
        found = sorted((Path(data_dir) / part).glob("part-*.parquet"))
        if not found:
            raise DatasetError(f"{data_dir}: split '{part}' has no shards")
        paths += found
    return paths


Pixels = TypeVar("Pixels")  # a torch.Tensor or a numpy array (this module does not import torch)


def normalize(pixels: Pixels, *, inplace: bool = False) -> Pixels:
    """(pixels - PIXEL_MEAN) / PIXEL_STD, as float32 (a float input keeps its dtype).

    `pixels`: uint8, or floats on the 0..255 scale (augmented images may leave it), as a torch
    tensor or a numpy array; the result is of the same kind. `inplace` overwrites a float input
    instead of allocating; an integer input is always converted into a new array first.
    """
    if isinstance(pixels, np.ndarray):
        x = pixels if np.issubdtype(pixels.dtype, np.floating) else pixels.astype(np.float32)
    else:
        x = pixels if pixels.is_floating_point() else pixels.float()
    if not inplace and x is pixels:
        return (x - PIXEL_MEAN) / PIXEL_STD
    x -= PIXEL_MEAN
    x /= PIXEL_STD
    return x


def denormalize(x: Pixels) -> Pixels:
    """uint8 pixels from normalised values (torch tensor or numpy array): clipped to 0..255, truncated.

    For display (augmented values off the 0..255 scale are clipped). Inverts `normalize`'s output
    exactly; a value a last bit below it (DALI's crop_mirror_normalize multiplies by 1 / std) may
    come back one level lower.
    """
    pixels = x * PIXEL_STD + PIXEL_MEAN
    if isinstance(pixels, np.ndarray):
        return np.clip(pixels, 0, 255).astype(np.uint8)
    return pixels.clamp(0, 255).byte()
