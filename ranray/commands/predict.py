"""`ranray predict`: detect and align every face (dlib), then classify it with a trained RAN and
show the attention each region got; optionally write the images with boxes and labels.

A video file (ranray.video.VIDEO_SUFFIXES) gets one CSV row per processed frame and face (time,
frame, track id, box, class, probabilities), every --every frames, and with --out the video again
with boxes, ids and labels; a video that cannot be read is one line and exit 2, a video without a
face a header-only CSV and exit 1.

The model is a file, checkpoint folder or run directory, a registered MLflow model
(models:/NAME/VERSION), or a shipped model (ranray.pretrained; the default). Every image gets its result or its own message (missing, not an image,
no face found); the exit status is 0 only when every image gave at least one face.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

HELP = "classify the faces in images with a trained RAN: class, probabilities, attention per region"
MODEL_HELP = ("model/best.pt or final.pt of a run, a checkpoint folder, a run directory, a registered "
              "model models:/NAME/VERSION, or a shipped model's name (ranray models; default: the shipped "
              "real-FERPlus model)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "--checkpoint", dest="model", help=MODEL_HELP)
    parser.add_argument("--tracking-uri", help="the MLflow store of a models:/ URI (default MLFLOW_TRACKING_URI)")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_VIDEO")
    parser.add_argument("--detector", choices=("hog", "cnn", "given"), default="hog",
                        help="dlib face detector; given: each image is one face crop")
    parser.add_argument("--out", help="write <image>_ran.png (<video>_ran.mp4 for a video) with boxes and labels "
                                      "into this folder")
    parser.add_argument("--every", type=int, default=1, metavar="N", help="videos: classify every N-th frame")
    parser.add_argument("--csv", metavar="PATH", help="one video: its CSV of faces (default <video>_faces.csv "
                                                      "in --out, else beside the video)")
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
    from ranray.video import VIDEO_SUFFIXES

    videos = [p for p in args.images if Path(p).suffix.lower() in VIDEO_SUFFIXES]
    images = [p for p in args.images if p not in videos]
    if args.csv and len(videos) > 1:
        print(f"ranray predict: --csv names one file but {len(videos)} videos were given; use --out DIR",
              file=sys.stderr)
        return 2
    status = max((predict_one_video(trained, v, args) for v in videos), default=0)
    if not images:
        return status
    results = predict(trained, images, detector=args.detector, out_dir=args.out)
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
    return max(status, 0 if all(r.faces for r in results) else 1)


def predict_one_video(trained: Any, video: str, args: argparse.Namespace) -> int:
    """0: faces found; 1: none in any frame (the CSV has its header); 2: the file is not a readable video."""
    from ranray.video import VideoError, predict_video

    stem = Path(video).stem
    csv_path = Path(args.csv) if args.csv else Path(args.out or Path(video).parent) / f"{stem}_faces.csv"
    annotated = Path(args.out) / f"{stem}_ran.mp4" if args.out else None
    try:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        report = predict_video(trained, video, csv_path, every=args.every, annotated=annotated,
                               detector=args.detector)
    except (VideoError, ValueError) as err:
        print(f"ranray predict: {err}", file=sys.stderr)
        return 2
    out = sys.stderr if args.json else sys.stdout  # --json keeps stdout for the photos' JSON
    print(report.summary(), file=out)
    print(f"{video}: faces CSV {report.csv}" + (f", annotated video {report.annotated}" if report.annotated else ""),
          file=out)
    return 1 if report.no_face else 0
