"""`ranray train / evaluate / predict` at the command line, and the checks that run before Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from train_fixtures import INPUT_SIZE, NUM_CLASSES, first_face_file, learnable_dataset, tiny_config

from ranray.cli import main
from ranray.config import ConfigError
from ranray.models import create_model
from ranray.train.checkpoint import export_model
from ranray.train.launch import preflight


@pytest.fixture(scope="module")
def untrained_model(tmp_path_factory, data_dir) -> Path:
    """An exported (untrained) RAN: enough for the evaluate / predict plumbing."""
    from ranray.models import build_ran

    cfg = tiny_config(data_dir, tmp_path_factory.mktemp("runs"), "cli")
    path, _ = export_model(build_ran(cfg.model).state_dict(), cfg, tmp_path_factory.mktemp("model") / "final.pt")
    return path


# ---------------------------------------------------------------------------------------------
# Refused before Ray starts
# ---------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ranray.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def refused(data_dir, tmp_path_factory) -> dict[str, Future]:
    """The refused `ranray train` commands, run at once: each child is one core's work, nearly all
    of it imports. name -> its CompletedProcess."""
    nowhere = tmp_path_factory.mktemp("missing") / "nowhere"
    commands = {"bad key": ("train", f"data.dir={data_dir}", "optim.learning_rate=0.1"),
                "missing dir": ("train", f"data.dir={nowhere}", "model.backbone=iresnet_tiny"),
                "pooled region": ("train", f"data.dir={data_dir}", "model.backbone=iresnet_tiny", "model.num_classes=4",
                                  "model.input_size=64", "model.region_features=pooled", "model.crop_frac=0.2")}
    with ThreadPoolExecutor(len(commands), thread_name_prefix="cli") as pool:
        return {name: pool.submit(run_cli, *args) for name, args in commands.items()}


def test_bad_key_is_refused_by_name_without_starting_ray(refused):
    out = refused["bad key"].result()
    assert out.returncode == 2
    assert "unknown config key 'optim.learning_rate'" in out.stderr
    assert "Ray" not in out.stderr + out.stdout  # nothing was started


def test_missing_data_dir_is_refused_without_starting_ray(refused):
    out = refused["missing dir"].result()
    assert out.returncode == 2
    assert "config key 'data.dir'" in out.stderr and "nowhere" in out.stderr
    assert "Ray" not in out.stderr + out.stdout


def test_a_pooled_region_under_one_feature_cell_is_refused_before_training(refused):
    out = refused["pooled region"].result()
    assert out.returncode == 2
    assert "config key 'model.crop_frac'" in out.stderr and "crop_frac 0.25, model.input_size 80" in out.stderr
    assert "Ray" not in out.stderr + out.stdout


def test_dir_that_is_not_a_prepared_dataset(tmp_path):
    with pytest.raises(ConfigError, match="data.dir.*no manifest.json"):
        preflight(tiny_config(tmp_path, tmp_path, "x"))


def test_wrong_shaped_backbone_checkpoint_is_refused(data_dir, tmp_path):
    wrong = tmp_path / "r18.pth"
    torch.save(create_model("iresnet18").state_dict(), wrong)
    with pytest.raises(ConfigError, match="model.init_backbone.*shape mismatches|model.init_backbone.*keys"):
        preflight(tiny_config(data_dir, tmp_path, "x", f"model.init_backbone={wrong}"))
    with pytest.raises(ConfigError, match="model.init_backbone.*not found"):
        preflight(tiny_config(data_dir, tmp_path, "x", f"model.init_backbone={tmp_path / 'absent.pth'}"))


def test_matching_backbone_checkpoint_passes(data_dir, tmp_path):
    good = tmp_path / "tiny.pth"
    torch.save(create_model("iresnet_tiny", input_size=INPUT_SIZE).state_dict(), good)  # the fc layer's shape
    manifest = preflight(tiny_config(data_dir, tmp_path, "x", f"model.init_backbone={good}"))
    assert manifest["num_classes"] == NUM_CLASSES


def test_class_names_come_from_the_dataset(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path, "x")
    manifest = preflight(cfg)
    assert cfg.model.class_names == manifest["class_names"] == ["neutral", "happiness", "surprise", "sadness"]
    with pytest.raises(ConfigError, match=r"'model.class_names' is \['a', 'b', 'c', 'd'\] but .* has \['neutral'"):
        preflight(tiny_config(data_dir, tmp_path, "x", "model.class_names=[a, b, c, d]"))
    with pytest.raises(ConfigError, match=r"'model.class_names' has 2 names for model.num_classes=4"):
        tiny_config(data_dir, tmp_path, "x", "model.class_names=[a, b]")


def test_training_in_another_label_mode_than_prepared_is_refused(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"'loss.label_mode' is 'crossentropy' but .* prepared with "
                                          r"label_mode='majority'"):
        preflight(tiny_config(data_dir, tmp_path, "x", "loss.label_mode=crossentropy"))
    assert preflight(tiny_config(data_dir, tmp_path, "x", "loss.label_mode=majority"))["label_mode"] == "majority"


def test_class_count_and_empty_subset_are_refused(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.num_classes"):
        preflight(tiny_config(data_dir, tmp_path, "x", "model.num_classes=8"))
    flagless = learnable_dataset(tmp_path / "flagless")
    for part in (flagless / "val").glob("part-*.parquet"):  # drop every pose45 flag from val
        table = pq.read_table(part)
        flags = [f & ~4 for f in table.column("flags").to_pylist()]
        column = table.schema.get_field_index("flags")
        pq.write_table(table.set_column(column, "flags", pa.array(flags, pa.int32())), part)
    with pytest.raises(ConfigError, match="data.val_split.*pose45"):
        preflight(tiny_config(flagless, tmp_path, "x", "data.train_subset=pose45"))


# ---------------------------------------------------------------------------------------------
# evaluate and predict
# ---------------------------------------------------------------------------------------------


def test_evaluate_cli_prints_table_and_writes_json(untrained_model, data_dir, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(untrained_model), "--data", str(data_dir),
                 "--split", "val", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "subset occlusion" in out
    saved = json.loads((tmp_path / "eval_val.json").read_text())
    assert saved["metrics"]["val_samples"] == 32 and len(saved["confusion"]) == NUM_CLASSES
    assert (tmp_path / "confusion_val.png").is_file()


def test_predict_cli_gives_class_probabilities_and_attention(untrained_model, data_dir, tmp_path, capsys):
    face = first_face_file(data_dir, tmp_path / "face.png")
    assert main(["predict", "--checkpoint", str(untrained_model), "--detector", "given", "--out",
                 str(tmp_path / "out"), "--json", str(face)]) == 0
    (pred,) = json.loads(capsys.readouterr().out)
    assert set(pred["probabilities"]) == {"neutral", "happiness", "surprise", "sadness"}
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    assert [a["region"] for a in pred["attention"]] == ["whole face", "top-left", "top-right"]
    assert all(0.0 < a["mu"] < 1.0 and 0.0 < a["nu"] < 1.0 for a in pred["attention"])
    assert (tmp_path / "out" / "face_ran.png").is_file()
