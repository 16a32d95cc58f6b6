"""`ranray synth`: write a synthetic face dataset in a real format (FERPlus csv pair, image folder,
identity folder), deterministic in the seed; prints the `ranray prepare` command that prepares it.
"""

from __future__ import annotations

import argparse
import shlex
import sys

HELP = "write synthetic faces (8 expressions, pose, occluders) as a FERPlus, image-folder or identity dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="a new (or empty) folder")
    parser.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("ferplus", "imagefolder", "identity"), default="ferplus")
    parser.add_argument("--size", type=int, default=0,
                        help="image side in pixels (default 48 ferplus, 112 folders, 256 with --wild)")
    parser.add_argument("--wild", action="store_true",
                        help="imagefolder: faces at random places in cluttered scenes (prepare with detector=hog)")
    parser.add_argument("--occlusion-frac", type=float, default=0.15, help="share of occluded faces")
    parser.add_argument("--large-pose-frac", type=float, default=0.15, help="share of faces turned 30-60 degrees")
    parser.add_argument("--per-identity", type=int, default=8, help="identity format: images per person")
    parser.add_argument("--pairs", type=int, default=400, help="identity format: verification pairs")


def run(args: argparse.Namespace) -> int:
    from ranray.data.synth import SynthOptions, synthesize

    opts = SynthOptions(n=args.n, seed=args.seed, format=args.format, size=args.size, wild=args.wild,
                        occlusion_frac=args.occlusion_frac, large_pose_frac=args.large_pose_frac,
                        per_identity=args.per_identity, pairs=args.pairs)
    try:
        result = synthesize(args.out, opts)
    except (FileExistsError, ValueError) as err:
        print(f"ranray synth: {err}", file=sys.stderr)
        return 2
    cfg = result.prepare_config(f"{args.out.rstrip('/')}_prepared")
    counts = ", ".join(f"{s} {n}" for s, n in result.counts.items())
    print(f"synthesized {sum(result.counts.values())} {args.format} images in {result.root} ({counts})")
    lists = " ".join(f"subset_lists.{k}={shlex.quote(v)}" for k, v in cfg.subset_lists.items())
    print(f"prepare with: ranray prepare {cfg.source} {shlex.quote(cfg.inputs[0])} --out {shlex.quote(cfg.out)} "
          f"detector={cfg.detector} {lists}")
    return 0
