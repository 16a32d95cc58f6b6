"""`ranray predict`: detect and align every face (dlib), then classify it with a trained RAN and
show the attention each region got; optionally write the images with boxes and labels."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

HELP = "classify the faces in images with a trained RAN: class, probabilities, attention per region"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="model/best.pt or final.pt of a run, a checkpoint folder, or a run directory")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--detector", choices=("hog", "cnn", "given"), default="hog",
                        help="dlib face detector; given: each image is one face crop")
    parser.add_argument("--out", help="write <image>_ran.png with boxes and labels into this folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    from ranray.train.evaluate import format_prediction, predict

    try:
        preds = predict(args.checkpoint, args.images, detector=args.detector, out_dir=args.out)
    except FileNotFoundError as err:
        print(f"ranray predict: {err}")
        return 2
    if args.json:
        print(json.dumps([asdict(p) for p in preds], indent=1))
    else:
        for p in preds:
            print(format_prediction(p))
    found = {p.image for p in preds}
    for image in args.images:
        if str(image) not in found:
            print(f"{image}: no face found" + ("" if args.detector == "given" else
                                                " (for face crops use --detector given)"))
    return 0 if preds else 1
