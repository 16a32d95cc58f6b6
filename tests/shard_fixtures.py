"""Small, valid prepared datasets for tests (manifest.json + <split>/part-*.parquet + rejects.parquet).

Independent of `ranray prepare`: faces are drawn with PIL (a face-like ellipse with eyes, brows, nose
and mouth, and a mark on the subject's right cheek so a mirror image differs from the original),
the 68 landmarks follow a fixed template with per-row jitter, labels cycle through the classes.
`corrupt` replaces chosen rows' image bytes by one of CORRUPTIONS, to test bad-input handling.

    from shard_fixtures import write_dataset
    data_dir = write_dataset(tmp_path / "ds", {"train": 40, "val": 10})
"""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from ranray.config import CLASS_NAMES
from ranray.data.schema import (FACE_SIZE, FLAG_OCCLUSION, FLAG_POSE30, FLAG_POSE45, NUM_LANDMARKS, NUM_VOTES,
                                REJECT_SCHEMA, SCHEMA_VERSION, SHARD_SCHEMA)


def _jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# Bad image bytes by kind: no image at all, a JPEG header over garbage (passes a magic-byte check,
# fails the decoder), a valid JPEG of the wrong size.
CORRUPTIONS: dict[str, Callable[[], bytes]] = {
    "garbage": lambda: b"this is not an image" * 8,
    "bad_jpeg": lambda: b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8)),
    "wrong_size": lambda: _jpeg(Image.new("RGB", (64, 48), (120, 90, 60))),
}


def template_landmarks() -> np.ndarray:
    """A plausible frontal 68-point layout (iBUG order) in FACE_SIZE pixel coordinates, (68, 2)."""
    s = FACE_SIZE / 112.0
    t = np.linspace(np.pi * 0.95, np.pi * 0.05, 17)  # jaw: image left (subject's right) to image right
    jaw = np.stack([56 + 44 * np.cos(t), 52 + 52 * np.sin(t)], 1)
    brow_r = np.stack([np.linspace(22, 48, 5), [40, 36, 35, 36, 38]], 1)
    brow_l = np.stack([112 - brow_r[::-1, 0], brow_r[::-1, 1]], 1)
    bridge = np.stack([[56] * 4, np.linspace(46, 66, 4)], 1)
    nose = np.stack([np.linspace(47, 65, 5), [70, 72, 73, 72, 70]], 1)
    eye_r = np.array([[28, 50], [33, 47], [39, 47], [44, 50], [39, 52], [33, 52]], float)
    eye_l = np.stack([112 - eye_r[[3, 2, 1, 0, 5, 4], 0], eye_r[[3, 2, 1, 0, 5, 4], 1]], 1)
    mouth_o = np.array([[38, 86], [44, 82], [51, 80], [56, 81], [61, 80], [68, 82], [74, 86],
                        [68, 91], [61, 94], [56, 94], [51, 94], [44, 91]], float)
    mouth_i = np.array([[42, 86], [51, 84], [56, 85], [61, 84], [70, 86], [61, 89], [56, 89], [51, 89]], float)
    pts = np.concatenate([jaw, brow_r, brow_l, bridge, nose, eye_r, eye_l, mouth_o, mouth_i])
    assert pts.shape == (NUM_LANDMARKS, 2)
    return (pts * s).astype(np.float32)


def draw_face(rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """A face image and its landmarks (jittered template)."""
    lm = template_landmarks() + rng.normal(0, 1.0, (NUM_LANDMARKS, 2)).astype(np.float32)
    bg = tuple(int(v) for v in rng.integers(20, 90, 3))
    img = Image.new("RGB", (FACE_SIZE, FACE_SIZE), bg)
    d = ImageDraw.Draw(img)
    skin = tuple(int(v) for v in rng.integers(140, 230, 3))
    d.ellipse([12, 8, 100, 108], fill=skin)
    for eye in (lm[36:42], lm[42:48]):
        d.polygon([tuple(p) for p in eye], fill=(40, 30, 30))
    for brow in (lm[17:22], lm[22:27]):
        d.line([tuple(p) for p in brow], fill=(60, 40, 30), width=2)
    d.line([tuple(p) for p in lm[27:31]], fill=(110, 80, 70), width=2)
    d.polygon([tuple(p) for p in lm[48:60]], fill=(170, 50, 60))
    d.ellipse([22, 62, 32, 72], fill=(90, 40, 40))  # a mole on the subject's right cheek: breaks symmetry
    noise = rng.normal(0, 4, (FACE_SIZE, FACE_SIZE, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr), lm


def _row_flags(i: int) -> int:
    return ((FLAG_OCCLUSION if i % 4 == 0 else 0) | (FLAG_POSE30 if i % 3 == 0 else 0)
            | (FLAG_POSE45 if i % 6 == 0 else 0))


Painter = Callable[[np.random.Generator], tuple[Image.Image, np.ndarray]]


def make_rows(split: str, n: int, *, num_classes: int, seed: int, corrupt: dict[int, str],
              draw: Painter = draw_face) -> list[dict]:
    rng = np.random.default_rng([seed, sum(split.encode())])
    rows = []
    for i in range(n):
        img, lm = draw(rng)
        label = i % num_classes
        votes = [0] * NUM_VOTES
        votes[label] = 10
        rows.append({
            "key": f"{split}/{i:05d}.png",
            "image": CORRUPTIONS[corrupt[i]]() if i in corrupt else _jpeg(img),
            "label": label,
            "target": [1.0 if c == label else 0.0 for c in range(num_classes)],
            "votes": votes,
            "landmarks": lm.reshape(-1).tolist(),
            "split": split,
            "flags": _row_flags(i),
            "source": "fixture",
        })
    return rows


def write_dataset(root: str | Path, splits: dict[str, int], *, rows_per_shard: int = 16, row_group_size: int = 8,
                  num_classes: int = len(CLASS_NAMES), seed: int = 0,
                  corrupt: dict[str, dict[int, str]] | None = None, draw: Painter = draw_face) -> Path:
    """Write a prepared dataset under `root`.

    corrupt: split -> {row number: CORRUPTIONS kind}; draw: rng -> (RGB FACE_SIZE image, (68, 2) landmarks).
    """
    root = Path(root)
    corrupt = corrupt or {}
    manifest_splits = {}
    for split, n in splits.items():
        rows = make_rows(split, n, num_classes=num_classes, seed=seed, corrupt=corrupt.get(split, {}), draw=draw)
        out = root / split
        out.mkdir(parents=True, exist_ok=True)
        shards = 0
        for shard, start in enumerate(range(0, n, rows_per_shard)):
            table = pa.Table.from_pylist(rows[start:start + rows_per_shard], schema=SHARD_SCHEMA)
            pq.write_table(table, out / f"part-{shard:05d}.parquet", row_group_size=row_group_size)
            shards += 1
        per_class = [sum(1 for r in rows if r["label"] == c) for c in range(num_classes)]
        manifest_splits[split] = {"rows": n, "per_class": per_class, "shards": shards}
    pq.write_table(pa.Table.from_pylist([], schema=REJECT_SCHEMA), root / "rejects.parquet")
    total = sum(splits.values())
    manifest = {
        "schema_version": SCHEMA_VERSION, "source": "fixture", "num_classes": num_classes,
        "class_names": list(CLASS_NAMES[:num_classes]), "label_mode": "majority", "splits": manifest_splits,
        "rows_in": total, "rows_written": total, "rows_rejected": 0, "rejects_by_reason": {},
        "config": {"writer": "tests/shard_fixtures.py", "seed": seed}, "code_version": "test",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root
