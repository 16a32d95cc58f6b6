"""How much of an aligned face is face: the black padding that alignment leaves in prepared sets, and
a picture of real faces (raw | aligned with each template | the RAN regions).

FER2013's faces are 48x48 crops, tighter than the frame insightface's template aligns to, so the
similarity warp shrinks them into black borders (docs/REAL_FACES.md). This measures it on prepared
datasets, so a template or alignment change is quoted before and after:

    .venv/bin/python bench/alignment.py --data data/ferplus_insightface data/ferplus      # table
    .venv/bin/python bench/alignment.py --raw data/ferplus_raw/data --picture docs/img/real_faces.png

Padding: the share of a face's 112x112 pixels darker than 8 of 255 in every channel (what the
warp's black fill leaves; real dark pixels count too, which the raw 48x48 images give as a floor).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import report  # noqa: E402

DARK = 8  # of 255: the warp fills with 0, and JPEG rounds it to a few levels above
PICTURE_FACES = ("fer0032222.png", "fer0032224.png", "fer0032226.png", "fer0032227.png", "fer0034656.png",
                 "fer0033878.png")  # test faces: two plain, two of RAN's pose > 45 list, two of its occlusion list


def padding_shares(images: list[bytes | np.ndarray]) -> np.ndarray:
    out = np.empty(len(images))
    for i, img in enumerate(images):
        arr = np.asarray(Image.open(io.BytesIO(img)).convert("RGB")) if isinstance(img, bytes) else img
        out[i] = (arr.max(axis=-1) < DARK).mean()
    return out


def prepared_faces(data_dir: Path, split: str) -> list[bytes]:
    faces = []
    for shard in sorted((data_dir / split).glob("*.parquet")):
        faces += pq.read_table(shard, columns=["image"]).column("image").to_pylist()
    if not faces:
        raise SystemExit(f"bench/alignment.py: {data_dir} has no {split} shards (a prepared dataset?)")
    return faces


def raw_faces(raw: Path, split_folder: str = "FER2013Test") -> list[np.ndarray]:
    """The raw 48x48 test faces, upscaled to 112 like an alignment of an upright, centred face."""
    return [np.asarray(Image.open(p).convert("RGB").resize((112, 112), Image.BICUBIC))
            for p in sorted((raw / split_folder).glob("*.png"))]


def summary_row(name: str, shares: np.ndarray, manifest: dict | None) -> list[object]:
    flags = {} if manifest is None else {k: sum(s.get("flags", {}).get("align_fallback", 0)
                                                 for s in manifest["splits"].values()) for k in ("fallback",)}
    template = "-" if manifest is None else manifest.get("align_template", "insightface")
    return [name, template, len(shares), f"{100 * np.median(shares):.1f}", f"{100 * np.mean(shares):.1f}",
            f"{100 * np.mean(shares > 0.25):.1f}", f"{100 * np.mean(shares > 0.40):.1f}",
            f"{100 * (1 - np.median(shares)):.1f}", flags.get("fallback", "-")]


def table(args: argparse.Namespace) -> None:
    rows = []
    if args.raw:
        rows.append(summary_row("raw 48x48 (resized)", padding_shares(raw_faces(Path(args.raw))), None))
    for d in map(Path, args.data):
        manifest = json.loads((d / "manifest.json").read_text())
        rows.append(summary_row(str(d), padding_shares(prepared_faces(d, args.split)), manifest))
    headers = ["faces", "template", "n", "padding median %", "padding mean %", "faces > 25% padding %",
               "faces > 40% padding %", "face share of frame (median) %", "fallback-aligned (all splits)"]
    report(f"Alignment padding on the {args.split} split (bench/alignment.py)", headers, rows,
           f"padding: pixels darker than {DARK}/255 in every channel; 1-min load {os.getloadavg()[0]:.1f}")


# ---------------------------------------------------------------------------------------------
# The picture
# ---------------------------------------------------------------------------------------------


def picture(raw: Path, out: Path, crop_frac: float, tile: int = 112) -> None:
    import torch

    from ranray.data.align import AlignOptions, FaceAligner
    from ranray.models.ran import crop_regions, fixed_layout

    aligners = {t: FaceAligner(AlignOptions(detector="given", template=t)) for t in ("insightface", "fer2013")}
    boxes = torch.cat([torch.tensor([[0.0, 0.0, 1.0, 1.0]]), fixed_layout(crop_frac)])[None]
    rows = []
    for name in PICTURE_FACES:
        img = Image.open(raw / "FER2013Test" / name).convert("RGB")
        aligned = {t: a.align(img).image for t, a in aligners.items()}
        face = torch.from_numpy(np.asarray(aligned["fer2013"], np.float32)).permute(2, 0, 1)[None]
        regions = crop_regions(face, boxes, tile)[0]  # (K, 3, tile, tile)
        tiles = [img.resize((tile, tile), Image.BICUBIC), aligned["insightface"], _boxes_drawn(aligned["fer2013"],
                 boxes[0])] + [Image.fromarray(r.permute(1, 2, 0).clamp(0, 255).byte().numpy()) for r in regions]
        rows.append(tiles)
    sheet = Image.new("RGB", (tile * len(rows[0]) + 4 * (len(rows[0]) - 1), tile * len(rows) + 4 * (len(rows) - 1)),
                      "white")
    for r, tiles in enumerate(rows):
        for c, t in enumerate(tiles):
            sheet.paste(t, (c * (tile + 4), r * (tile + 4)))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"wrote {out}: per row raw 48x48 | insightface template | fer2013 template with the regions | "
          f"the {boxes.shape[1]} regions (whole face first, crop_frac {crop_frac})")


COLOURS = ("red", "lime", "cyan", "yellow", "magenta")


def _boxes_drawn(face: Image.Image, boxes) -> Image.Image:
    face = face.copy()
    draw = ImageDraw.Draw(face)
    side = face.size[0]
    for i, b in enumerate(boxes[1:].tolist()):
        draw.rectangle([v * (side - 1) for v in b], outline=COLOURS[i % len(COLOURS)])
    return face


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="*", default=[], help="prepared datasets to measure")
    p.add_argument("--split", default="test")
    p.add_argument("--raw", help="the FERPlus folder holding FER2013Test/ (raw faces: a floor, and the picture)")
    p.add_argument("--picture", help="write raw | aligned | regions of a few test faces to this PNG (needs --raw)")
    p.add_argument("--crop-frac", type=float, default=0.6)
    args = p.parse_args(argv)
    if args.picture:
        if not args.raw:
            raise SystemExit("bench/alignment.py: --picture needs --raw (the folder holding FER2013Test/)")
        picture(Path(args.raw), Path(args.picture), args.crop_frac)
    if args.data or (args.raw and not args.picture):
        table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
