"""The fine-tuning loop on a real local Ray: 2 Train workers, tiny backbone, tiny learnable data.

One failure-free run is the reference; a run with an injected worker failure and a run resumed
over a truncated checkpoint must apply exactly the same steps, on the same batches, once each.
A job that fails for good marks its MLflow run FAILED: that is the driver's, the same for both
runtimes, so it runs through the local runtime (a Ray worker's death and its FAILED run:
test_worker_death).
"""

from __future__ import annotations

import contextlib
import math
import re
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from concurrent_runs import run_together
from mlflow_reads import metric_history
from step_hooks import committed_steps
from train_fixtures import NUM_CLASSES, SPLITS, tiny_config

from ranray.config import OptimConfig, flatten
from ranray.data.loader import build_loader
from ranray.evaluation import evaluate
from ranray.inference import load_trained_model
from ranray.models import build_ran, share_concentration
from ranray.tracking import find_runs, list_artifacts, read_local_log
from ranray.train.checkpoint import STATE_FILE, load_checkpoint
from ranray.train.finetune import FineTune
from ranray.train.launch import run_training
from ranray.train.optim import lr_factor
from ranray.train.ray_train import build_trainer

STEPS_PER_EPOCH = SPLITS["train"] // (2 * 8)  # 2 workers, batch 8, drop_last
TOTAL_STEPS = 2 * STEPS_PER_EPOCH


@pytest.fixture(scope="module")
def ray_runs(ray_session, data_dir, storage) -> dict[str, Future]:
    """The module's Ray runs, two at a time (concurrent_runs): the failure-free reference, the run
    with a worker failure, and the run stopped at step 8 that is rerun over a truncated checkpoint."""
    fault = tiny_config(data_dir, storage, "fault", "checkpoint.max_failures=1",
                        hooks=("step_hooks:fail_at_step_5_on_rank_1",))
    return run_together({"baseline": lambda: run_training(tiny_config(data_dir, storage, "baseline")),
                         "rerun": lambda: stopped_and_rerun(data_dir, storage),
                         "fault": lambda: run_training(fault)})


@pytest.fixture(scope="module")
def baseline(ray_runs):
    """The failure-free reference run."""
    return ray_runs["baseline"].result()


def stopped_and_rerun(data_dir: Path, storage: Path):
    """(the first run, the rerun's Ray result)."""
    # A run that stops at step 8 (mid-epoch), as if its driver had died there...
    first = run_training(tiny_config(data_dir, storage, "rerun", "max_steps=8"))
    newest = first.run_dir / f"checkpoint_{8:08d}_g00" / STATE_FILE
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    # ...then the same run name again, through the trainer Tune uses, with a tracking server that
    # does not answer: resumption takes step 6, and the run finishes with tracking kept locally.
    # In bf16 this time: precision changes the arithmetic, not which batches the steps train on.
    cfg = tiny_config(data_dir, storage, "rerun", "tracking.uri=http://127.0.0.1:9", "precision=bf16")
    return first, build_trainer(cfg).fit()


def lineages(run_dir: Path) -> dict[int, list[tuple[int, int, str]]]:
    return {rank: committed_steps(run_dir / "steps" / f"rank{rank}.log") for rank in (0, 1)}


def step_lines(run_dir: Path, rank: int) -> list[int]:
    lines = (run_dir / "steps" / f"rank{rank}.log").read_text().splitlines()
    return [int(line.split()[1]) for line in lines if line.startswith("step ")]


# ---------------------------------------------------------------------------------------------
# A plain run
# ---------------------------------------------------------------------------------------------


def test_short_run_learns_and_reports(baseline):
    m = baseline.metrics
    assert m["step"] == TOTAL_STEPS and m["epoch"] == 2 and m["epoch_end"] == 1
    assert m["best_val_accuracy"] >= 0.5 > 1.0 / NUM_CLASSES  # chance is 0.25
    assert m["val_samples"] == SPLITS["val"]  # every validation row counted once across the 2 ranks
    for key in ("val_loss", "val_acc_neutral", "val_acc_occlusion", "val_acc_pose30", "val_acc_clean", "lr",
                "images_per_s", "train_loss"):
        assert key in m and math.isfinite(m[key]), key


def test_loss_falls(baseline):
    losses = [v for _, v in metric_history(baseline.tracking_uri, baseline.mlflow_run_id, "train_loss")]
    assert len(losses) == TOTAL_STEPS
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_checkpoints_exist_verify_and_load(baseline):
    dirs = sorted(p for p in baseline.run_dir.glob("checkpoint_*") if p.is_dir())
    assert [d.name for d in dirs] == [f"checkpoint_{TOTAL_STEPS - 2:08d}_g00", f"checkpoint_{TOTAL_STEPS:08d}_g00"]
    state = load_checkpoint(dirs[-1] / STATE_FILE)
    assert state["step"] == TOTAL_STEPS and state["train_state"]["mid_epoch"] is False
    assert {"model", "optimizer", "scheduler", "scaler", "loader", "config"} <= set(state)
    for rank in (0, 1):
        own = load_checkpoint(dirs[-1] / f"rank{rank}.pt")
        assert own["rank"] == rank and "torch" in own["rng"]
    for name in ("best.pt", "final.pt"):
        trained = load_trained_model(baseline.run_dir / "model" / name)
        assert trained.cfg.model.num_classes == NUM_CLASSES
    final = load_trained_model(baseline.final_model).net.state_dict()
    assert all(torch.equal(final[k], v) for k, v in state["model"].items())
    folder = load_trained_model(dirs[-1]).net.state_dict()  # the checkpoint folder: the same weights
    assert folder.keys() == final.keys() and all(torch.equal(folder[k], v) for k, v in final.items())


RAY_ONLY = {".validate_storage_marker", "checkpoint_manager_snapshot.json", "logs"}  # Ray Train's; workers' stderr
OTHER_RANK = re.compile(r"rank[1-9][0-9]*\.")


def run_layout(run_dir: Path) -> set[str]:
    """The run directory's files as a layout: checkpoint folders as checkpoint_*, without Ray's own
    files, other ranks' files and the MLflow store's insides (ids)."""
    layout = set()
    for path in run_dir.rglob("*"):
        parts = path.relative_to(run_dir).parts
        if parts[0] in RAY_ONLY or OTHER_RANK.match(parts[-1]) or (parts[0] == "mlartifacts" and len(parts) > 1):
            continue
        layout.add("/".join(("checkpoint_*" if p.startswith("checkpoint_") else p) for p in parts))
    return layout


def test_a_local_run_leaves_the_run_directory_and_exported_model_of_a_ray_run(baseline, data_dir, storage):
    local = run_training(tiny_config(data_dir, storage, "local", "scaling.num_workers=1"), runtime="local")
    assert run_layout(local.run_dir) == run_layout(baseline.run_dir)
    assert local.artifacts.keys() == baseline.artifacts.keys()
    for name in ("final", "best"):
        ours, theirs = (load_checkpoint(r.run_dir / "model" / f"{name}.pt") for r in (local, baseline))
        assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
        ours, theirs = (flatten(yaml.safe_load((r.run_dir / "model" / f"{name}.yaml").read_text()))
                        for r in (local, baseline))
        assert {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)} == {
            "run.name", "scaling.num_workers"}
    assert local.metrics.keys() == baseline.metrics.keys()


def test_mlflow_has_params_metrics_and_pictures(baseline):
    runs = find_runs(baseline.tracking_uri, "ranray-test")
    run = next(r for r in runs if r["run_id"] == baseline.mlflow_run_id)
    assert run["status"] == "FINISHED"
    assert run["params"]["model.backbone"] == "iresnet_tiny" and run["params"]["optim.lr"] == "0.05"
    assert {"train_loss", "lr", "images_per_s", "val_accuracy", "val_acc_neutral", "epoch_train_loss"} <= set(
        run["metrics"])
    artifacts = set(list_artifacts(baseline.tracking_uri, baseline.mlflow_run_id))
    assert {"config.yaml", "plots/confusion_val.png", "plots/attention_faces.png", "model/best.pt",
            "ran_model/MLmodel"} <= artifacts  # the MLflow model, logged by the driver after training


def test_every_step_once_in_order(baseline):
    for rank, lineage in lineages(baseline.run_dir).items():
        assert [s for s, _, _ in lineage] == list(range(1, TOTAL_STEPS + 1)), rank
    assert lineages(baseline.run_dir)[0] != lineages(baseline.run_dir)[1]  # ranks train different batches


def test_offline_evaluate_writes_table_json_and_png(baseline, data_dir, tmp_path):
    report = evaluate(baseline.best_model, data_dir, "test", out_dir=tmp_path)
    assert report.metrics["test_samples"] == SPLITS["test"]
    assert report.accuracy > 1.0 / NUM_CLASSES
    assert "test_acc_occlusion" in report.metrics and "subset occlusion" in report.table()
    assert Path(report.files["json"]).is_file() and Path(report.files["confusion"]).stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# Failures and resumption
# ---------------------------------------------------------------------------------------------


def test_worker_failure_mid_epoch_resumes_without_repeating_a_step(baseline, ray_runs):
    # Rank 1 raises after step 5; the newest checkpoint is step 4, so step 5 is trained twice in
    # the log, but only once in the lineage of the final model.
    result = ray_runs["fault"].result()
    assert result.metrics["step"] == baseline.metrics["step"] == TOTAL_STEPS
    assert (result.run_dir / "faults" / "fail_at_step_5").exists()
    assert step_lines(result.run_dir, 1).count(5) == 2
    assert lineages(result.run_dir) == lineages(baseline.run_dir)  # same steps, same batches, once each
    starts = [line for line in (result.run_dir / "steps" / "rank0.log").read_text().splitlines()
              if line.startswith("start")]
    assert starts == ["start 0 0", "start 1 4"]


def test_truncated_newest_checkpoint_is_skipped_on_rerun(baseline, ray_runs):
    first, result = ray_runs["rerun"].result()  # stopped at step 8, its newest checkpoint truncated, rerun
    assert result.metrics["step"] == TOTAL_STEPS
    log = (first.run_dir / "steps" / "rank0.log").read_text().splitlines()
    assert [line for line in log if line.startswith("start")] == ["start 0 0", "start 1 6"]
    assert lineages(first.run_dir) == lineages(baseline.run_dir)
    kinds = {r["kind"] for r in read_local_log(first.run_dir)}
    assert {"params", "metrics", "status"} <= kinds


def test_job_failure_marks_the_mlflow_run_failed(data_dir, storage):
    cfg = tiny_config(data_dir, storage, "fails", "epochs=1", "scaling.num_workers=1",
                      hooks=("step_hooks:fail_at_step_1",))
    with pytest.raises(Exception, match="fail_at_step"):
        run_training(cfg, runtime="local")
    run_dir = storage / "fails"
    runs = find_runs(f"sqlite:///{run_dir / 'mlflow.db'}", "ranray-test")
    assert [r["status"] for r in runs] == ["FAILED"]


# ---------------------------------------------------------------------------------------------
# Pieces without Ray
# ---------------------------------------------------------------------------------------------


def test_lr_warmup_then_step_schedule_at_epoch_fractions():
    o = OptimConfig(lr=0.1, warmup_epochs=1.0, schedule="step", milestones=[0.3, 0.5, 0.8], gamma=0.1)
    f = [lr_factor(s, steps_per_epoch=10, epochs=10, o=o) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warm-up over epoch 0
    assert f[10] == f[29] == 1.0 and f[30] == pytest.approx(0.1)  # drop when epoch 3 of 10 starts
    assert f[50] == pytest.approx(0.01) and f[80] == pytest.approx(0.001) and f[99] == pytest.approx(0.001)


def test_step_schedule_drops_at_int_of_the_epoch_fraction_as_the_reference():
    o = OptimConfig(warmup_epochs=0.0, schedule="step", milestones=[0.3, 0.5, 0.8], gamma=0.1)
    drops = lambda epochs: [e for e in range(1, epochs)  # noqa: E731
                            if lr_factor(e, steps_per_epoch=1, epochs=epochs, o=o)
                            < lr_factor(e - 1, steps_per_epoch=1, epochs=epochs, o=o)]
    assert drops(7) == [2, 3, 5]  # int(2.1), int(3.5), int(5.6); ceil would give 3, 4, 6
    assert drops(10) == [3, 5, 8]  # 0.3 * 10 is 3.0000000000000004: ceil would drop at 4
    assert drops(60) == [18, 30, 48]


def test_cosine_schedule_decays_to_zero():
    o = OptimConfig(schedule="cosine", warmup_epochs=0.0)
    f = [lr_factor(s, steps_per_epoch=5, epochs=4, o=o) for s in range(20)]
    assert f[0] == 1.0 and all(a > b for a, b in zip(f, f[1:])) and f[-1] < 0.01
    assert f[10] == pytest.approx(0.5)


def test_share_entropy_adds_its_weighted_penalty_to_the_fine_tuning_loss(data_dir, tmp_path):
    """The penalty (loss.share_entropy) enters FineTune.loss with its weight; 0 leaves the loss as it was."""
    plain = tiny_config(data_dir, tmp_path, "plain")
    weighted = tiny_config(data_dir, tmp_path, "weighted", "loss.share_entropy=0.5")
    torch.manual_seed(0)
    net = build_ran(plain.model).eval()  # eval: no dropout, BN running stats: both calls see one function
    batch = next(iter(build_loader(data_dir, "train", batch_size=8, backend="torch", num_threads=0)))
    batch["landmarks"] = None
    engine = SimpleNamespace(model=net, autocast=contextlib.nullcontext)
    with torch.no_grad():
        out = net(batch["images"])
        gap = FineTune(weighted).loss(engine, batch) - FineTune(plain).loss(engine, batch)
    penalty = share_concentration(out.mu, out.nu)
    assert penalty.item() > 0.0
    assert gap.item() == pytest.approx(0.5 * penalty.item(), rel=1e-4, abs=1e-6)
