"""Evaluation protocols (clean, ran) through the local runtime (one worker, this process), and the
paper's ablations as models. The protocols are the loop's: what Ray adds (2 workers' shares of a
split counted once) is in test_finetune's Ray run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow_reads import metric_history
from train_fixtures import NUM_CLASSES, SPLITS, tiny_config

from ranray.config import ConfigError, ModelConfig, load_config, TrainConfig
from ranray.data.schema import DatasetError, shard_paths
from ranray.models import RegionAttentionNetwork, build_ran
from ranray.cli import main
from ranray.tracking import find_runs, list_artifacts
from ranray.train.launch import describe, run_training
from ranray.train.protocols import protocol_splits


def test_protocol_splits():
    data = TrainConfig().data
    clean, ran = protocol_splits("clean", data), protocol_splits("ran", data)
    assert (clean.train, clean.monitor, clean.selects_best, clean.test_once) == ("train", "val", True, "test")
    assert (ran.train, ran.monitor, ran.selects_best, ran.test_once) == ("train+val", "test", False, None)
    with pytest.raises(ConfigError, match="'protocol' must be one of"):
        load_config(TrainConfig, None, ["protocol=paper"])


def test_joined_splits_read_both(data_dir):
    both = shard_paths(data_dir, "train+val")
    assert both == shard_paths(data_dir, "train") + shard_paths(data_dir, "val")
    with pytest.raises(DatasetError, match="split 'nope' has no shards"):
        shard_paths(data_dir, "train+nope")


def local_run(data_dir: Path, storage: Path, name: str, *overrides: str):
    return run_training(tiny_config(data_dir, storage, name, "scaling.num_workers=1", "log_every_n_steps=50",
                                    *overrides), runtime="local")


@pytest.fixture(scope="module")
def clean_run(data_dir, storage):
    return local_run(data_dir, storage, "clean")


@pytest.fixture(scope="module")
def ran_run(data_dir, storage):
    return local_run(data_dir, storage, "ran", "protocol=ran")


def test_clean_protocol_selects_on_val_and_tests_the_best_model_once(clean_run):
    result = clean_run
    (run,) = [r for r in find_runs(result.tracking_uri, "ranray-test") if r["run_id"] == result.mlflow_run_id]
    assert run["params"]["protocol"] == "clean" and run["tags"]["model_variant"] == "ran"
    assert run["tags"]["rb_margin"] == "0.1" and run["tags"]["rb_space"] == "softmax"
    test = metric_history(result.tracking_uri, result.mlflow_run_id, "test_accuracy")
    assert len(test) == 1  # one look at the test split, at the end
    assert run["metrics"]["test_samples"] == SPLITS["test"]
    assert test[0][1] >= 0.5 > 1.0 / NUM_CLASSES
    assert run["tags"]["test_accuracy"] == f"{test[0][1]:.4f}"
    assert run["metrics"]["val_samples"] == SPLITS["val"]
    rows = dict(describe(result))
    assert rows["protocol"] == "clean (best epoch on val, tested once)"
    assert rows["test accuracy"] == f"{test[0][1]:.4f}" == f"{result.metrics['test_accuracy']:.4f}"


def test_ran_protocol_trains_on_train_and_val_and_reports_the_last_epoch(ran_run):
    result = ran_run
    steps_per_epoch = (SPLITS["train"] + SPLITS["val"]) // 8  # one worker, batch 8
    assert result.metrics["step"] == 2 * steps_per_epoch  # val rows are training rows here
    (run,) = [r for r in find_runs(result.tracking_uri, "ranray-test") if r["run_id"] == result.mlflow_run_id]
    assert run["params"]["protocol"] == "ran" and run["tags"]["protocol"] == "ran"
    history = metric_history(result.tracking_uri, result.mlflow_run_id, "test_accuracy")
    assert [s for s, _ in history] == [steps_per_epoch, 2 * steps_per_epoch]  # watched every epoch
    assert run["metrics"]["test_samples"] == SPLITS["test"] and "val_accuracy" not in run["metrics"]
    # The reported model is the last epoch's, whatever test accuracy an earlier epoch had.
    assert run["metrics"]["best_epoch"] == 2
    assert run["metrics"]["best_test_accuracy"] == history[-1][1]
    rows = dict(describe(result))
    assert rows["protocol"].startswith("ran (trained on train + val") and "val accuracy (last / best)" not in rows


def test_compare_puts_runs_side_by_side_in_markdown_and_mlflow(clean_run, ran_run, tmp_path, capsys):
    assert main(["compare", str(clean_run.run_dir), str(ran_run.run_dir), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines()
            if line.startswith("| clean") or line.startswith("| ran")}
    head = [c.strip("| ") for c in out.splitlines()[0].split(" | ")]
    for result, protocol in ((clean_run, "clean"), (ran_run, "ran")):
        (run,) = [r for r in find_runs(result.tracking_uri, "ranray-test") if r["run_id"] == result.mlflow_run_id]
        cells = dict(zip(head, (c.strip("| ") for c in rows[result.run_name])))
        assert (cells["protocol"], cells["model"], cells["split"]) == (protocol, "ran", "test")
        assert cells["accuracy"] == f"{100 * run['metrics']['test_accuracy']:.2f}"
        assert cells["happiness"] == f"{100 * run['metrics']['test_acc_happiness']:.2f}"
        assert cells["occlusion"] == f"{100 * run['metrics']['test_acc_occlusion']:.2f}"
    assert "different protocols (clean, ran); their figures are not comparable" in out
    (logged,) = find_runs(clean_run.tracking_uri, "ranray-test", "attributes.run_name = 'compare'")
    assert logged["tags"]["compared_runs"] == f"{clean_run.mlflow_run_id},{ran_run.mlflow_run_id}"
    assert "compare.md" in list_artifacts(clean_run.tracking_uri, logged["run_id"])
    assert (tmp_path / "cmp" / "compare.md").read_text() in out


def test_compare_refuses_a_directory_that_is_no_run(tmp_path, capsys):
    assert main(["compare", str(tmp_path), "--no-mlflow"]) == 2
    assert "is not a training run directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Ablations as models
# ---------------------------------------------------------------------------------------------


def _net(**kw) -> RegionAttentionNetwork:
    torch.manual_seed(0)
    return RegionAttentionNetwork(ModelConfig(backbone="iresnet_tiny", num_classes=NUM_CLASSES, **kw)).eval()


def test_whole_face_baseline_is_one_region_through_the_backbone():
    net = _net(variant="whole_face")
    images = torch.randn(2, 3, 112, 112)
    out = net(images)
    assert net.num_regions == 1 and out.mu.shape == (2, 1) and out.nu.shape == (2, 1)
    torch.testing.assert_close(net.region_boxes(images), torch.tensor([[[0.0, 0.0, 1.0, 1.0]]] * 2))
    feats = net.backbone(images)  # one crop, the whole face, resampled to itself
    torch.testing.assert_close(out.features, torch.cat([feats, feats], dim=1), rtol=1e-4, atol=1e-5)


def test_no_relation_pools_with_self_attention_alone():
    net = _net(variant="no_relation", num_regions=4)
    assert net.beta is None and net.classifier.in_features == net.alpha.in_features
    images = torch.randn(2, 3, 112, 112)
    out = net(images)
    crops = net.regions(images).flatten(0, 1)
    f = net.backbone(crops).view(2, 4, -1)
    mu = torch.sigmoid(net.alpha(f)).squeeze(-1)
    torch.testing.assert_close(out.features, (mu[..., None] * f).sum(1) / mu.sum(1, keepdim=True),
                               rtol=1e-4, atol=1e-5)
    assert torch.equal(out.nu, torch.ones(2, 4))


def test_variants_keep_or_drop_the_rb_loss(data_dir):
    from ranray.train.finetune import FineTune

    tasks = {v: FineTune(load_config(TrainConfig, None, [f"data.dir={data_dir}", f"model.variant={v}"]))
             for v in ("ran", "whole_face", "no_rb_loss", "no_relation")}
    assert {v: t.rb_loss for v, t in tasks.items()} == {"ran": True, "whole_face": False, "no_rb_loss": False,
                                                        "no_relation": True}
    assert build_ran(ModelConfig(backbone="iresnet_tiny", variant="no_rb_loss")).beta is not None
    with pytest.raises(ConfigError, match="'model.variant': unknown variant 'tiny'"):
        RegionAttentionNetwork(ModelConfig(backbone="iresnet_tiny", variant="tiny"))


def test_random_regions_with_the_rb_loss_are_warned_about_before_training(data_dir, caplog):
    from ranray.train.launch import preflight

    def warnings_for(*overrides: str) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="ranray.train"):
            preflight(tiny_config(data_dir, data_dir.parent / "runs", "warn", "model.region_mode=random", *overrides))
        return [r.getMessage() for r in caplog.records if "region_mode random" in r.getMessage()]

    (message,) = warnings_for()
    assert "model.variant=no_rb_loss" in message and "docs/OCCLUSION.md" in message
    assert warnings_for("model.variant=no_rb_loss") == []
