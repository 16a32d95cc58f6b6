"""What a model was trained on: the data card kept beside an exported model.

    describe_training_data(data_dir)   from the prepared dataset's manifest: source format, rows per
                                       split, whether the faces are synthetic (ranray synth), when
    write_data_card(model, data_dir)   model/best.data.json beside model/best.pt (atomic)
    read_data_card(weights, cfg)       the card; a model exported without one is described from its
                                       config's data.dir while that still exists, else "unknown"
    synthetic_warning(card)            the sentence predict, evaluate and the demo print for a model
                                       that has seen synthetic faces only

A synthetic dataset is one whose prepare inputs hold `synth.json` (what ranray.data.synth writes
beside the images); a manifest that says `"synthetic": true|false` itself is believed first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CARD_SUFFIX = ".data.json"


def card_path(model_path: str | os.PathLike) -> Path:
    return Path(model_path).with_suffix(CARD_SUFFIX)


def describe_training_data(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The data card of a prepared dataset; raises DatasetError when it is not one."""
    from ranray.data.schema import read_manifest, synthetic_inputs

    manifest = read_manifest(data_dir)
    inputs = [str(p) for p in (manifest.get("config") or {}).get("inputs", [])]
    synthetic = manifest.get("synthetic")
    if synthetic is None:
        synthetic = synthetic_inputs(inputs)
    return {
        "data_dir": str(Path(data_dir).resolve()),
        "source": manifest.get("source", "unknown"),
        "synthetic": bool(synthetic),
        "inputs": inputs,
        "rows": {split: info.get("rows", 0) for split, info in (manifest.get("splits") or {}).items()},
        "class_names": manifest.get("class_names", []),
        "label_mode": manifest.get("label_mode", ""),
        "label_files": (manifest.get("reader") or {}).get("label_files", {}),  # sha256 per label file
        "detector": manifest.get("detector", ""),
        # Datasets prepared before the template became a choice were aligned to insightface's.
        "align_template": manifest.get("align_template", "insightface"),
        "prepared": manifest.get("created", ""),
        "code_version": manifest.get("code_version", ""),
    }


def write_data_card(model_path: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """Write the card of `data_dir` beside `model_path` (temp file + os.replace)."""
    path = card_path(model_path)
    card = {**describe_training_data(data_dir), "described_from": "card"}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(card, indent=1))
    os.replace(tmp, path)
    return path


def read_data_card(weights: str | os.PathLike, cfg: Any = None) -> dict[str, Any]:
    """The card beside `weights`; else one made now from cfg.data.dir (a model from before cards);
    else {"described_from": "unknown"}."""
    from ranray.data.schema import DatasetError

    path = card_path(weights)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            return {"described_from": "unknown", "problem": f"{path} is not JSON"}
    data_dir = getattr(getattr(cfg, "data", None), "dir", "")
    if data_dir and Path(data_dir).is_dir():
        try:
            return {**describe_training_data(data_dir), "described_from": "data.dir of its config"}
        except DatasetError:
            pass
    return {"described_from": "unknown"}


def describe(card: dict[str, Any]) -> str:
    """One line: what the model was trained on."""
    if card.get("described_from", "unknown") == "unknown":
        return "unknown (no data card beside the model, and its data.dir is gone)"
    rows = card.get("rows") or {}
    kind = "synthetic faces" if card.get("synthetic") else "faces"
    return f"{sum(rows.values())} {kind} in {card.get('source')} format ({card.get('data_dir')})"


def synthetic_warning(card: dict[str, Any]) -> str | None:
    if not card.get("synthetic"):
        return None
    return ("WARNING: this model was trained on synthetic faces only (ranray synth, "
            f"{card.get('data_dir')}); its expressions on real photographs are not meaningful")
