"""`ranray export --model M --onnx out.onnx`: the whole trained RAN as one ONNX graph (dynamic batch),
with its model card and preprocessing recipe in the metadata, kept only once onnxruntime agrees with
torch on real faces (ranray.export).

The faces checked on: the photographs given with --faces (aligned as `ranray predict` aligns them),
else the model's own test faces (its data card's dataset, while that exists) and scikit-image's
astronaut (when scikit-image is installed); random tensors only when none of these is at hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = ("export a trained RAN to ONNX (dynamic batch, model card and preprocessing in the metadata), "
        "checked against torch")
OWN_TEST_FACES = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ranray.commands.predict import MODEL_HELP

    parser.add_argument("--model", "--checkpoint", dest="model", help=MODEL_HELP)
    parser.add_argument("--onnx", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, help="ONNX opset (default ranray.export.DEFAULT_OPSET, 17)")
    parser.add_argument("--faces", nargs="+", metavar="PHOTO", default=[],
                        help="photographs whose faces the export is checked on (default: the model's own test "
                             "faces and scikit-image's astronaut)")
    parser.add_argument("--tracking-uri", help="the MLflow store of a models:/ URI (default MLFLOW_TRACKING_URI)")


def run(args: argparse.Namespace) -> int:
    from ranray.data.schema import DatasetError
    from ranray.export import DEFAULT_OPSET, OnnxMismatch, export_onnx
    from ranray.train.checkpoint import CheckpointError
    from ranray.inference import load_trained_model

    try:
        trained = load_trained_model(args.model, tracking_uri=args.tracking_uri)
        faces = check_faces(trained, args.faces)
        report = export_onnx(trained, args.onnx, faces, opset=args.opset or DEFAULT_OPSET)
    except (FileNotFoundError, ValueError, CheckpointError, DatasetError, OnnxMismatch) as err:
        print(f"ranray export: {err}", file=sys.stderr)
        return 2
    print(f"ranray export: {trained.source} -> {report.path} (opset {report.opset}, dynamic batch; inputs "
          f"{', '.join(report.inputs)}; outputs {', '.join(report.outputs)}; weights sha256 {report.weights_sha256})")
    print(f"ranray export: {report.check.line()}")
    return 0


def check_faces(trained, photos: list[str]):
    """--faces, else every real face source at hand, else random tensors (ranray.export.Faces)."""
    from ranray.export import dataset_faces, photo_faces, random_faces

    if photos:
        return photo_faces(trained, photos)
    found = []
    data_dir = trained.data.get("data_dir") or trained.cfg.data.dir
    if data_dir and Path(data_dir, "manifest.json").is_file():
        found.append(dataset_faces(data_dir, trained.cfg.data.test_split, OWN_TEST_FACES))
    astronaut = _astronaut()
    if astronaut is not None:
        found.append(photo_faces(trained, [("scikit-image's astronaut", astronaut)]))
    return sum(found[1:], found[0]) if found else random_faces()


def _astronaut():
    try:
        from skimage import data
    except ImportError:
        return None
    from PIL import Image

    return Image.fromarray(data.astronaut())
