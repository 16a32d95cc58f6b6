"""`ranray predict`: detect and align every face (dlib), then classify it with a trained RAN and
show the attention each region got; optionally write the images with boxes and labels.

The model is a file, checkpoint folder or run directory, a registered MLflow model
(models:/NAME/VERSION), or a shipped model (ranray.pretrained; the default). Every image gets its result or its own message (missing, not an image,
no face found); the exit status is 0 only when every image gave at least one face.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

HELP = "classify the faces in images with a trained RAN: class, probabilities, attention per region"
MODEL_HELP = ("model/best.pt or final.pt of a run, a checkpoint folder, a run directory, a registered "
              "model models:/NAME/VERSION, or a shipped model's name (ranray models; default: the shipped "
              "real-FERPlus model)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "--checkpoint", dest="model", help=MODEL_HELP)
    parser.add_argument("--tracking-uri", help="the MLflow store of a models:/ URI (default MLFLOW_TRACKING_URI)")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--detector", choices=("hog", "cnn", "given"), default="hog",
                        help="dlib face detector; given: each image is one face crop")
    parser.add_argument("--out", help="write <image>_ran.png with boxes and labels into this folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    from ranray.model_card import describe, synthetic_warning
    from ranray.inference import load_trained_model
    from ranray.prediction import format_prediction, predict

    try:
        trained = load_trained_model(args.model, tracking_uri=args.tracking_uri)
    except (FileNotFoundError, ValueError) as err:
        print(f"ranray predict: {err}", file=sys.stderr)
        return 2
    warning = synthetic_warning(trained.data)
    if warning:
        print(warning, file=sys.stderr)
    results = predict(trained, args.images, detector=args.detector, out_dir=args.out)
    faces = [face for r in results for face in r.faces]
    if args.json:
        print(json.dumps([asdict(f) for f in faces], indent=1))
    else:
        print(f"model {trained.source}, trained on {describe(trained.data)}")
        for face in faces:
            print(format_prediction(face))
    for r in results:
        if r.annotated:
            print(f"{r.image}: annotated image {r.annotated}", file=sys.stderr)
        if r.error:
            print(f"ranray predict: {r.error}", file=sys.stderr)
    return 0 if all(r.faces for r in results) else 1
