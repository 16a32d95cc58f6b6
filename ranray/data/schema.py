"""The prepared-dataset contract shared by `prepare` (writer) and the loaders (readers).

A prepared dataset is a directory:
    manifest.json              schema version, counts per split and class, rejects by reason, config
    <split>/part-NNNNN.parquet shards with SHARD_SCHEMA
    rejects.parquet            REJECT_SCHEMA: every input row that was not written, with its reason
Invariant (checked by prepare, stored in the manifest): rows_in == rows_written + rows_rejected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1
FACE_SIZE = 112
NUM_LANDMARKS = 68
NUM_VOTES = 10  # FERPlus: 8 emotions + unknown + NF

# Row flags (a bitmask), so evaluation can report the RAN paper's subsets separately.
FLAG_OCCLUSION = 1
FLAG_POSE30 = 2
FLAG_POSE45 = 4
SUBSET_FLAGS = {"occlusion": FLAG_OCCLUSION, "pose30": FLAG_POSE30, "pose45": FLAG_POSE45}
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
    paths = sorted((Path(data_dir) / split).glob("part-*.parquet"))
    if not paths:
        raise DatasetError(f"{data_dir}: split '{split}' has no shards")
    return paths
