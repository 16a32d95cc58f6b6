"""What a model was trained on: the data card, and the plain warning that `ranray predict`,
`ranray evaluate` and the demo summary give for a model that has seen synthetic faces only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from skimage import data
from train_fixtures import learnable_dataset, tiny_config

from ranray.cli import main
from ranray.commands.demo import summary
from ranray.data.synth import SynthOptions, synthesize
from ranray.evaluation import EvalReport
from ranray.inference import load_trained_model
from ranray.model_card import card_path, describe_training_data, read_data_card, write_data_card
from ranray.train.checkpoint import export_model
from ranray.train.launch import TrainingResult

WARNING = "trained on synthetic faces only"


def synthetic_prepared(root: Path) -> Path:
    """A prepared set whose manifest names a `ranray synth` folder as its input, as prepare writes it."""
    raw = synthesize(root / "synth", SynthOptions(n=12, format="ferplus")).root
    prepared = learnable_dataset(root / "prepared")
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["config"] = {"source": "ferplus", "inputs": [str(raw)]}
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    return prepared


@pytest.fixture(scope="module")
def models(tmp_path_factory, data_dir) -> dict[str, Path]:
    from ranray.models import build_ran

    root = tmp_path_factory.mktemp("cards")
    out = {}
    for kind, prepared in (("synthetic", synthetic_prepared(root / "s")), ("real", data_dir)):
        cfg = tiny_config(prepared, root / "runs", kind)
        out[kind], _ = export_model(build_ran(cfg.model).state_dict(), cfg, root / kind / "best.pt")
    return out


def test_the_card_says_synthetic_and_outlives_the_data(tmp_path):
    prepared = synthetic_prepared(tmp_path)
    card = describe_training_data(prepared)
    assert card["synthetic"] is True and card["rows"] == {"train": 96, "val": 32, "test": 32}
    assert describe_training_data(learnable_dataset(tmp_path / "plain"))["synthetic"] is False

    weights = tmp_path / "model" / "best.pt"
    weights.parent.mkdir()
    written = write_data_card(weights, prepared)
    assert written == card_path(weights) == tmp_path / "model" / "best.data.json"
    shutil.rmtree(prepared)  # the model is copied elsewhere, its data is gone: the card still tells
    kept = read_data_card(weights)
    assert kept["synthetic"] is True and kept["described_from"] == "card"
    assert read_data_card(tmp_path / "elsewhere.pt") == {"described_from": "unknown"}


def test_predict_and_evaluate_warn_plainly_for_a_synthetic_model_only(models, tmp_path, capsys):
    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    assert main(["predict", "--model", str(models["synthetic"]), str(photo)]) == 0
    out = capsys.readouterr()
    assert WARNING in out.err and "synthetic faces in" in out.out  # "trained on 160 synthetic faces in ..."
    assert main(["predict", "--model", str(models["real"]), str(photo)]) == 0
    out = capsys.readouterr()
    assert WARNING not in out.err + out.out

    data_dir = load_trained_model(models["synthetic"]).cfg.data.dir
    assert main(["evaluate", "--model", str(models["synthetic"]), "--data", data_dir, "--split", "val",
                 "--out", str(tmp_path / "eval")]) == 0
    assert WARNING in capsys.readouterr().out


def test_demo_summary_says_what_the_model_has_seen(models, tmp_path):
    trained = load_trained_model(models["synthetic"])
    report = EvalReport(split="test", metrics={"test_accuracy": 0.9, "test_samples": 32.0, "test_acc_clean": 0.95},
                        confusion=[[1]], class_names=["neutral"], checkpoint=trained.source,
                        data_dir=trained.cfg.data.dir, files={"json": "eval.json", "confusion": "cm.png"},
                        trained_on=trained.data)
    result = TrainingResult(run_name="demo", run_dir=tmp_path, metrics={"best_val_accuracy": 0.9}, checkpoint=None,
                            final_model=None, best_model=models["synthetic"], tracking_uri="sqlite:///x.db",
                            mlflow_run_id="r", ui_command="mlflow ui", elapsed_s=1.0)
    text = summary(result, report, {"train": 1.0}, 2.0)
    assert "trained on" in text and "160 synthetic faces" in text
    assert text.rstrip().splitlines()[-1].startswith("WARNING: this model was trained on synthetic faces only")
