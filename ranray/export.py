"""ONNX export of a trained RAN, checked against torch before it is kept.

    export_onnx(trained, out, faces)      the whole network (regions, backbone, both attention modules,
                                          classifier) as one ONNX graph with a dynamic batch axis; its
                                          metadata carry the model card, the preprocessing recipe, the
                                          ranray version and the source weights' sha256. The graph is
                                          written beside `out`, checked by check_onnx, then renamed to
                                          `out`: a graph that disagrees with torch is never left behind.
    check_onnx(trained, path, faces)      onnxruntime against torch on aligned faces, at batch 1 and a
                                          larger batch: max |difference| per output, OnnxMismatch past
                                          TOLERANCE
    photo_faces / dataset_faces           real faces to check on: photographs aligned as `ranray predict`
                                          aligns them, or a prepared dataset's aligned faces
    random_faces                          noise, for when no real face is at hand

The graph's inputs are what predict hands the network: `images` (N, 3, FACE_SIZE, FACE_SIZE) float32,
aligned RGB faces normalised as ranray.data.schema.normalize does, and, for region_mode=landmark
models only, `landmarks` (N, 68, 2) in aligned-face pixels. A model trained on grey faces makes its
input grey inside the graph, as classify_aligned does (ranray.inference.Preprocessing.colour). The exporter is torch's TorchScript-based
one (dynamo=False): it needs only the `onnx` package, where the dynamo exporter needs onnxscript too.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import ranray
from ranray.data.schema import FACE_SIZE, NUM_LANDMARKS, shard_paths
from ranray.model_card import describe
from ranray.train.checkpoint import verify_checkpoint
from ranray.inference import TrainedModel, face_tensor, region_names, to_grey
from ranray.prediction import align_faces, detect_faces, face_aligner, open_image

DEFAULT_OPSET = 17
OUTPUTS = ("logits", "probabilities", "self_attention", "relation_attention")
# How far onnxruntime may be from torch on real faces, per output: max |difference|, for logits divided
# by the face's largest |logit| (at least 1), since the two runtimes' fp32 kernels sum in other orders
# and the rounding grows with the values summed. Measured on the shipped model (31 FERPlus test faces
# and the astronaut, batch 1 and 32): logits 1.1e-5 of the largest (7.9e-5 absolute at logits up to
# 10.8), probabilities 6.2e-6, self-attention 3.0e-7, relation-attention 4.8e-7.
TOLERANCE = {"logits": 1e-4, "probabilities": 1e-4, "self_attention": 1e-5, "relation_attention": 1e-5}
SCALED = {"logits"}  # outputs whose error is relative to the face's largest |value|
MIN_CHECK_BATCH = 5  # the larger batch of the check: all faces, repeated up to this many rows
BATCH_AXIS = "batch"
MODEL_CARD_MD = "MODEL_CARD.md"  # a human model card beside the weights travels too, when there is one
# metadata_props keys
META_MODEL_CARD = "ranray.model_card"
META_MODEL_CARD_MD = "ranray.model_card_md"
META_PREPROCESSING = "ranray.preprocessing"
META_VERSION = "ranray.version"
META_WEIGHTS_SHA256 = "ranray.weights_sha256"


class OnnxMismatch(RuntimeError):
    """onnxruntime's outputs differ from torch's by more than TOLERANCE."""


@dataclass
class Faces:
    """Aligned faces to check an export on: images (N, 3, S, S) normalised, landmarks (N, 68, 2)."""

    images: torch.Tensor
    landmarks: torch.Tensor
    sources: list[str] = field(default_factory=list)  # where they came from, for the report

    def __len__(self) -> int:
        return self.images.shape[0]

    def __add__(self, other: Faces) -> Faces:
        return Faces(torch.cat([self.images, other.images]), torch.cat([self.landmarks, other.landmarks]),
                     self.sources + other.sources)

    def rows(self, n: int) -> Faces:
        """n rows, cycling through the faces (a batch larger than the faces there are)."""
        idx = torch.arange(n) % len(self)
        return Faces(self.images[idx], self.landmarks[idx], self.sources)


@dataclass
class CheckReport:
    faces: int
    sources: list[str]
    batches: list[int]
    max_error: dict[str, float]  # per output, over every batch
    tolerance: dict[str, float]

    def line(self) -> str:
        errors = ", ".join(f"{k} {v:.1e}{_relative(k)} (tolerance {self.tolerance[k]:.0e})"
                           for k, v in self.max_error.items())
        return (f"checked on {self.faces} faces ({'; '.join(self.sources)}) at batch "
                f"{' and '.join(map(str, self.batches))}: max |onnxruntime - torch| {errors}")


def _relative(name: str) -> str:
    return " of the largest |logit|" if name in SCALED else ""


@dataclass
class ExportReport:
    path: Path
    opset: int
    inputs: list[str]
    outputs: list[str]
    weights_sha256: str
    check: CheckReport


# ---------------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------------


class ExportedRAN(nn.Module):
    """What the ONNX graph computes: logits, softmax probabilities and both attention weights, of
    the faces made grey first when the model was trained on grey ones (as classify_aligned does)."""

    def __init__(self, net: nn.Module, grey: bool):
        super().__init__()
        self.net, self.grey = net, grey

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        out = self.net(to_grey(images) if self.grey else images, landmarks)
        logits = out.logits.float()
        return logits, torch.softmax(logits, dim=1), out.mu, out.nu


def input_names(trained: TrainedModel) -> list[str]:
    return ["images", "landmarks"] if trained.uses_landmarks else ["images"]


def export_onnx(trained: TrainedModel, out_path: str | os.PathLike, faces: Faces,
                opset: int = DEFAULT_OPSET) -> ExportReport:
    """Verify the source weights, export, write the metadata, check on `faces`, then move into place."""
    out_path = Path(out_path)
    sha256 = source_sha256(trained)
    names = input_names(trained)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        export_graph(exported(trained), tmp, model_inputs(trained, faces.rows(2)), names, opset)
        write_metadata(tmp, metadata(trained, sha256))
        try:
            check = check_onnx(trained, tmp, faces)
        except OnnxMismatch as exc:
            raise OnnxMismatch(f"{out_path} not written: {exc}") from exc
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(out_path, opset, names, list(OUTPUTS), sha256, check)


def exported(trained: TrainedModel) -> ExportedRAN:
    # The wrapper's own mode decides dropout and BN in the trace.
    return ExportedRAN(trained.net, trained.preprocessing.grey).eval()


def export_graph(wrapper: ExportedRAN, path: Path, example: tuple[torch.Tensor, ...], names: list[str],
                 opset: int = DEFAULT_OPSET) -> None:
    """The bare graph of `wrapper` at `path`, every input and output with a dynamic batch axis."""
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (see the module doc); the shape checks the tracer
        # freezes are of the fixed face size, not the batch.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(wrapper, example, str(path), input_names=names, output_names=list(OUTPUTS),
                          dynamic_axes={name: {0: BATCH_AXIS} for name in [*names, *OUTPUTS]},
                          opset_version=opset, dynamo=False)


def source_sha256(trained: TrainedModel) -> str:
    """The weights' sha256 from their manifest, after checking the file still matches it (CheckpointError
    naming the file otherwise). A registered model (no local file) is described by its URI instead."""
    if trained.weights is None:
        return f"unknown ({trained.source})"
    return verify_checkpoint(trained.weights)["sha256"]


def model_inputs(trained: TrainedModel, faces: Faces) -> tuple[torch.Tensor, ...]:
    return (faces.images, faces.landmarks) if trained.uses_landmarks else (faces.images,)


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


def preprocessing_recipe(trained: TrainedModel) -> dict[str, Any]:
    """What `ranray predict` does to a photograph before the network, for a runtime without ranray
    (ranray.inference.Preprocessing, the recipe predict applies, spelled out)."""
    from ranray.data.align import TEMPLATES

    recipe = trained.preprocessing
    m = trained.cfg.model
    out = {
        "detector": "dlib get_frontal_face_detector (HOG), upsampled once for images under 800 px; every face found",
        "landmarks": f"dlib shape_predictor_{recipe.landmarks}_face_landmarks inside each detector box",
        "align": "similarity transform of the 5 points (eye centres, nose tip, mouth corners) onto the template",
        "align_template": recipe.align_template,
        "align_template_points": np.round(TEMPLATES[recipe.align_template], 4).tolist(),
        "input_size": [recipe.aligned_size, recipe.aligned_size],
        "region_input_size": recipe.input_size,
        "channels": "RGB",
        # grey: the model was trained on grey faces; the graph turns its RGB input into BT.601 luma
        # (0.299 R + 0.587 G + 0.114 B) in all three channels itself
        "colour": recipe.colour,
        "layout": "NCHW",
        "dtype": "float32",
        "mean": [recipe.mean] * 3,
        "std": [recipe.std] * 3,
        "normalize": "(pixel - mean) / std, pixel in 0..255",
        "class_names": list(trained.class_names),
        "region_mode": m.region_mode,
        "region_features": m.region_features,
        "regions": region_names(m.region_mode, trained.net.num_regions),
        "inputs": input_names(trained),
        "outputs": list(OUTPUTS),
    }
    if trained.uses_landmarks:
        out["landmarks_input"] = (f"(N, {NUM_LANDMARKS}, 2) float32 x, y of the 68 landmarks in aligned-face "
                                  "pixels, pixel centres at integer coordinates")
    return out


def model_card(trained: TrainedModel) -> dict[str, Any]:
    return {"source": trained.source, "trained_on": describe(trained.data), "data_card": trained.data,
            "model": dataclasses.asdict(trained.cfg.model)}


def metadata(trained: TrainedModel, sha256: str) -> dict[str, str]:
    props = {
        META_MODEL_CARD: json.dumps(model_card(trained)),
        META_PREPROCESSING: json.dumps(preprocessing_recipe(trained)),
        META_VERSION: ranray.__version__,
        META_WEIGHTS_SHA256: sha256,
    }
    card_md = Path(trained.weights).with_name(MODEL_CARD_MD) if trained.weights else None
    if card_md is not None and card_md.is_file():
        props[META_MODEL_CARD_MD] = card_md.read_text()
    return props


def write_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


# ---------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------


def check_onnx(trained: TrainedModel, path: str | os.PathLike, faces: Faces,
               tolerance: dict[str, float] = TOLERANCE) -> CheckReport:
    """Run the graph in onnxruntime at batch 1 and at max(len(faces), MIN_CHECK_BATCH); raise
    OnnxMismatch naming the output, batch and error when an output is further from torch than allowed."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = exported(trained)
    batches = [1, max(len(faces), MIN_CHECK_BATCH)]
    worst = dict.fromkeys(OUTPUTS, 0.0)
    for batch in batches:
        inputs = model_inputs(trained, faces.rows(batch))
        got = session.run(list(OUTPUTS), {n: x.numpy() for n, x in zip(input_names(trained), inputs)})
        with torch.no_grad():
            expected = wrapper(*inputs)
        for name, g, e in zip(OUTPUTS, got, expected):
            if g.shape != tuple(e.shape):
                raise OnnxMismatch(f"the graph's output {name} has shape {g.shape} at batch {batch}, "
                                   f"torch {tuple(e.shape)}")
            error = output_error(name, g, e.numpy())
            if not error <= tolerance[name]:  # NaN fails too
                raise OnnxMismatch(f"the graph's output {name} differs from torch by {error:.2e}{_relative(name)} at "
                                   f"batch {batch} (tolerance {tolerance[name]:.0e})")
            worst[name] = max(worst[name], error)
    return CheckReport(len(faces), faces.sources, batches, worst, dict(tolerance))


def output_error(name: str, got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| over the batch; for SCALED outputs per face over max(1, its largest |value|)."""
    diff = np.abs(got - expected)
    if name in SCALED:
        diff = diff / np.maximum(1.0, np.abs(expected).max(axis=1, keepdims=True))
    return float(diff.max())


# ---------------------------------------------------------------------------------------------
# Faces to check on
# ---------------------------------------------------------------------------------------------


def photo_faces(trained: TrainedModel, photos: Sequence[str | os.PathLike | tuple[str, Any]]) -> Faces:
    """Every face of every photograph (a path, or a (name, PIL image) pair), detected and aligned as
    `ranray predict` does it (HOG detector, the model's own template); ValueError when one has none."""
    aligner = face_aligner(trained)
    images, landmarks, sources = [], [], []
    for photo in photos:
        name, image = photo if isinstance(photo, tuple) else (str(photo), open_image(photo))
        found = align_faces(aligner, image, detect_faces(np.asarray(image.convert("L")), "hog"))
        if not found.boxes:  # a box the landmark fit refuses is skipped, as predict skips it
            raise ValueError(f"no face found in {name} (HOG detector, as `ranray predict` runs it)")
        images.append(found.images)
        landmarks.append(found.landmarks)
        sources.append(f"{len(found.boxes)} aligned from {name}")
    return Faces(torch.cat(images), torch.cat(landmarks), sources)


def dataset_faces(data_dir: str | os.PathLike, split: str = "test", n: int = 8) -> Faces:
    """Up to n aligned faces from the first shard of a prepared dataset's split (DatasetError when it has none)."""
    import pyarrow.parquet as pq
    from PIL import Image

    rows = pq.read_table(shard_paths(data_dir, split)[0], columns=["image", "landmarks"]).slice(0, n).to_pylist()
    images = torch.cat([face_tensor(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])
    landmarks = torch.tensor([r["landmarks"] for r in rows], dtype=torch.float32).view(-1, NUM_LANDMARKS, 2)
    return Faces(images, landmarks, [f"{len(rows)} from {data_dir} ({split})"])


def random_faces(n: int = MIN_CHECK_BATCH, seed: int = 0) -> Faces:
    """Normalised noise with the mean face's landmarks: the check's last resort when no real face is at hand."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, FACE_SIZE, FACE_SIZE, generator=g) * 2 - 1
    centre = torch.tensor([FACE_SIZE / 2, FACE_SIZE / 2])
    landmarks = (centre + torch.randn(n, NUM_LANDMARKS, 2, generator=g) * FACE_SIZE / 8).clamp(0, FACE_SIZE - 1)
    return Faces(images, landmarks, [f"{n} random tensors (no real faces were at hand)"])


