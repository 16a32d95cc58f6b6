"""The local runtime (ranray.train.local): the engine, the fine-tuning task and the loop in this
process, without Ray; its checkpoints resume; it trains where Ray, MLflow, DALI and dlib cannot
be imported; and what it cannot run is refused by key before any work.

The comparison with a Ray run's directory and exported model is in test_finetune (its Ray run).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from blocked_imports import env_without
from mlflow_reads import metric_history
from step_hooks import committed_steps
from train_fixtures import NUM_CLASSES, SPLITS, tiny_config

from ranray.cli import main
from ranray.config import ConfigError, save_config
from ranray.inference import load_trained_model
from ranray.journal import read_local_log
from ranray.train.checkpoint import STATE_FILE, load_checkpoint, verify_checkpoint
from ranray.train.launch import run_training

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STEPS_PER_EPOCH = SPLITS["train"] // 8  # one worker, batch 8
TOTAL_STEPS = 2 * STEPS_PER_EPOCH


def local_config(data_dir: Path, storage: Path, name: str, *overrides: str, hooks: tuple[str, ...] = ()):
    # At the input size the old-main fixture was written with: every run here is compared with `plain`.
    return tiny_config(data_dir, storage, name, "scaling.num_workers=1", "model.input_size=112", *overrides,
                       hooks=hooks)


@pytest.fixture(scope="module")
def plain(data_dir, storage, children):
    """An uninterrupted local run: the reference. The module's child processes (`children`) run
    meanwhile, on the other core."""
    return run_training(local_config(data_dir, storage, "plain"), runtime="local")


def steps_log(run_dir: Path) -> Path:
    return run_dir / "steps" / "rank0.log"


# ---------------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------------


def test_a_local_fine_tune_learns_and_reports(plain):
    m = plain.metrics
    assert m["step"] == TOTAL_STEPS and m["epoch"] == 2 and m["epoch_end"] == 1
    assert m["best_val_accuracy"] >= 0.5 > 1.0 / NUM_CLASSES  # chance is 0.25
    assert m["val_samples"] == SPLITS["val"]
    assert m["test_accuracy"] > 1.0 / NUM_CLASSES  # the clean protocol's one test of best.pt
    losses = [v for _, v in metric_history(plain.tracking_uri, plain.mlflow_run_id, "train_loss")]
    assert len(losses) == TOTAL_STEPS  # log_every_n_steps=1
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_local_checkpoints_are_committed_folders_the_newest_kept(plain):
    run_dir = plain.run_dir
    names = sorted(p.name for p in run_dir.iterdir() if p.name.startswith(("checkpoint_", ".checkpoint_")))
    assert names == [f"checkpoint_{TOTAL_STEPS - 2:08d}_g00", f"checkpoint_{TOTAL_STEPS:08d}_g00"]  # keep=2
    assert plain.checkpoint == str(run_dir / names[-1])
    for name in names:
        verify_checkpoint(run_dir / name / STATE_FILE)
        assert load_checkpoint(run_dir / name / "rank0.pt")["step"] == int(name.split("_")[1])
    state = load_checkpoint(run_dir / names[-1] / STATE_FILE)
    assert state["step"] == TOTAL_STEPS and state["world_size"] == 1


def test_the_exported_model_loads_and_classifies(plain):
    model = load_trained_model(plain.final_model)
    assert model.cfg.model.num_classes == NUM_CLASSES
    out = model.net(torch.zeros(2, 3, 112, 112))
    assert out.logits.shape == (2, NUM_CLASSES)


def test_the_local_bar_is_drawn_in_this_process(data_dir, tmp_path, capfd):
    cfg = local_config(data_dir, tmp_path, "bar", "epochs=1", "checkpoint.every_n_steps=0", "run.progress=off",
                       hooks=("ranray.train.progress:forced",))
    assert run_training(cfg, runtime="local").metrics["step"] == STEPS_PER_EPOCH
    err = capfd.readouterr().err
    final = rf"epoch 1/1 loss \d+\.\d+ \d+ img/s: 100%\|[^|]*\| {STEPS_PER_EPOCH}/{STEPS_PER_EPOCH} "
    assert re.search(final, err), err[-2000:]


# ---------------------------------------------------------------------------------------------
# Resume after an interruption
# ---------------------------------------------------------------------------------------------


def test_a_killed_local_run_resumes_from_its_checkpoint_and_trains_each_step_once(plain, data_dir, storage):
    """step_hooks.fail_at_step_3 raises after step 3 (the last checkpoint is step 2): the local
    runtime has no restarts, so the run ends; the same command again resumes at step 2."""
    cfg = local_config(data_dir, storage, "killed", hooks=("step_hooks:fail_at_step_3",))
    with pytest.raises(RuntimeError, match="fail_at_step: rank 0 fails after step 3"):
        run_training(cfg, runtime="local")
    run_dir = storage / "killed"
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == ["checkpoint_00000002_g00"]
    resumed = run_training(cfg, runtime="local")
    assert resumed.resumed and resumed.metrics["step"] == TOTAL_STEPS
    starts = [line for line in steps_log(run_dir).read_text().splitlines() if line.startswith("start")]
    assert starts == ["start 0 0", "start 1 2"]  # generation 1 resumed at the checkpoint's step
    # The same steps, on the same batches, each applied once: as the uninterrupted run.
    assert committed_steps(steps_log(run_dir)) == committed_steps(steps_log(plain.run_dir))
    final, reference = load_checkpoint(resumed.final_model), load_checkpoint(plain.final_model)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[key], reference[key]) for key in reference)  # bit for bit


OLD_MAIN_RUN = TESTS / "fixtures" / "run_main_9463196"


def test_a_checkpoint_written_by_main_before_the_runtime_seam_resumes_bit_for_bit(plain, data_dir, storage):
    """The fixture is a Ray Train run of the same config written by main 9463196 (before this engine's
    runtime seam), killed after step 3 with its checkpoint at step 2 (make_fixture.py says how). The
    local runtime picks it up at step 2 and ends on the uninterrupted run's weights, bit for bit."""
    run_dir = storage / "old_main"
    run_dir.mkdir()
    shutil.copytree(OLD_MAIN_RUN / "checkpoint_00000002_g00", run_dir / "checkpoint_00000002_g00")
    shutil.copytree(OLD_MAIN_RUN / "steps", run_dir / "steps")
    shutil.copy(OLD_MAIN_RUN / "config.yaml", run_dir / "config.yaml")  # its data.dir and storage: the maker's
    verify_checkpoint(run_dir / "checkpoint_00000002_g00" / STATE_FILE)
    resumed = run_training(local_config(data_dir, storage, "old_main"), runtime="local")
    assert resumed.resumed and resumed.metrics["step"] == TOTAL_STEPS
    starts = [line for line in steps_log(run_dir).read_text().splitlines() if line.startswith("start")]
    assert starts == ["start 0 0", "start 1 2"]
    assert committed_steps(steps_log(run_dir)) == committed_steps(steps_log(plain.run_dir))
    final, reference = load_checkpoint(resumed.final_model), load_checkpoint(plain.final_model)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[key], reference[key]) for key in reference)


def test_a_local_rerun_skips_a_truncated_newest_checkpoint_and_an_unfinished_one(plain, data_dir, storage):
    """Killed after step 5 (checkpoints 2 and 4); then step 4's state is cut short and an unfinished
    checkpoint folder is left behind, as a kill while writing would: the rerun resumes from step 2."""
    cfg = local_config(data_dir, storage, "truncated", hooks=("step_hooks:fail_at_step_5",))
    with pytest.raises(RuntimeError, match="fails after step 5"):
        run_training(cfg, runtime="local")
    run_dir = storage / "truncated"
    newest = run_dir / f"checkpoint_{4:08d}_g00" / STATE_FILE
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    unfinished = run_dir / f".checkpoint_{6:08d}_g00.partial"
    unfinished.mkdir()
    (unfinished / STATE_FILE).write_bytes(b"half")
    resumed = run_training(cfg, runtime="local")
    assert resumed.metrics["step"] == TOTAL_STEPS and not unfinished.exists()
    starts = [line for line in steps_log(run_dir).read_text().splitlines() if line.startswith("start")]
    assert starts == ["start 0 0", "start 1 2"]
    assert committed_steps(steps_log(run_dir)) == committed_steps(steps_log(plain.run_dir))


# ---------------------------------------------------------------------------------------------
# Refused before any work
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers, message", [
    ("2", "config key 'scaling.num_workers' is 2 but --local runs one worker"),
    ("2-8", "config key 'scaling.num_workers' is the range 2-8 (elastic) but --local runs one worker"),
])
def test_local_refuses_more_than_one_worker_by_key_before_any_work(data_dir, tmp_path, workers, message):
    cfg = tiny_config(data_dir, tmp_path, "many", f"scaling.num_workers={workers}")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_training(cfg, runtime="local")
    assert not (tmp_path / "many").exists()  # nothing was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is of a machine without a GPU")
def test_local_refuses_use_gpu_without_a_gpu_by_key(data_dir, tmp_path):
    cfg = local_config(data_dir, tmp_path, "gpu", "scaling.use_gpu=true", "precision=fp32")
    with pytest.raises(ConfigError, match="config key 'scaling.use_gpu' is true but torch sees no CUDA GPU"):
        run_training(cfg, runtime="local")
    assert not (tmp_path / "gpu").exists()


def test_local_refuses_object_store_storage_by_key(data_dir, tmp_path):
    cfg = local_config(data_dir, tmp_path, "s3", "run.storage_path=s3://bucket/runs")
    with pytest.raises(ConfigError, match="config key 'run.storage_path' is 's3://bucket/runs' but --local"):
        run_training(cfg, runtime="local")


def test_local_refuses_dali_where_it_cannot_be_imported(data_dir, tmp_path, monkeypatch, capsys):
    import ranray.train.local as local

    monkeypatch.setattr(local, "dali_importable", lambda: False)
    cfg_path = save_config(local_config(data_dir, tmp_path, "dali", "data.loader=dali"), tmp_path / "job.yaml")
    assert main(["train", "--local", "--config", str(cfg_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ranray train: config key 'data.loader' is 'dali' but NVIDIA DALI (nvidia.dali) cannot be "
                   "imported here; set data.loader=torch")
    assert not (tmp_path / "dali").exists()


# ---------------------------------------------------------------------------------------------
# Without Ray, MLflow, DALI and dlib
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_only(tmp_path_factory) -> dict[str, str]:
    """The environment of a child process in which `import ray` (mlflow, nvidia.dali, dlib) fails."""
    return env_without(tmp_path_factory.mktemp("torch_only"), ("ray", "mlflow", "nvidia.dali", "dlib"), str(TESTS))


def ranray_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ranray.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_the_blocker_blocks(torch_only):
    code = ("import importlib\nfor m in ('ray', 'mlflow', 'nvidia.dali', 'dlib'):\n"
            "    try:\n        importlib.import_module(m)\n    except ImportError:\n        print('blocked', m)\n")
    done = subprocess.run([sys.executable, "-c", code], env=torch_only, capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[:4] == ["blocked ray", "blocked mlflow", "blocked nvidia.dali", "blocked dlib"]


ENGINE_IMPORTS = ("import sys\nimport ranray.models, ranray.train.engine, ranray.train.local, ranray.train.launch, "
                  "ranray.train.finetune, ranray.train.pretrain, ranray.commands.train, ranray.inference, "
                  "ranray.evaluation, ranray.prediction\n"
                  "print(sorted(m for m in ('ray', 'mlflow', 'nvidia.dali', 'dlib', 'ranray.model_store') "
                  "if m in sys.modules))")


@pytest.fixture(scope="module")
def children(torch_only, data_dir, tmp_path_factory) -> Iterator[dict[str, tuple[Future, Path | None]]]:
    """The module's heavier child processes, one after the other in the background from the first
    test on: this process trains on one core meanwhile (OMP_NUM_THREADS=1), and a child shares
    nothing else with it. name -> (its CompletedProcess, its folder)."""
    bare, ray = tmp_path_factory.mktemp("bare"), tmp_path_factory.mktemp("ray")
    bare_job = save_config(local_config(data_dir, bare, "bare", "epochs=1", "checkpoint.every_n_steps=0"),
                           bare / "job.yaml")
    ray_job = save_config(tiny_config(data_dir, ray, "ray"), ray / "job.yaml")
    with ThreadPoolExecutor(1, thread_name_prefix="child") as pool:
        yield {"imports": (pool.submit(subprocess.run, [sys.executable, "-c", ENGINE_IMPORTS], capture_output=True,
                                       text=True, timeout=120), None),
               "bare": (pool.submit(ranray_cli, torch_only, "train", "--local", "--config", str(bare_job)), bare),
               "ray": (pool.submit(ranray_cli, torch_only, "train", "--config", str(ray_job)), ray)}


def test_the_engine_models_inference_and_local_runtime_import_none_of_the_four(children):
    """Nor the MLflow model (ranray.model_store): the driver logs it, no worker imports it; dlib
    comes only when a photo's faces are detected."""
    done = children["imports"][0].result()
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_train_local_runs_where_ray_mlflow_dali_and_dlib_cannot_be_imported(children):
    child, tmp_path = children["bare"]
    done = child.result()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "val accuracy (last / best)" in done.stdout
    run_dir = tmp_path / "bare"
    assert "mlflow cannot be imported: tracking goes to RUN_DIR/metrics.jsonl" in done.stdout + done.stderr
    assert (run_dir / "model" / "final.pt").is_file() and (run_dir / "model" / "best.pt").is_file()
    assert [p.name for p in run_dir.glob("checkpoint_*")] == [f"checkpoint_{STEPS_PER_EPOCH:08d}_g00"]
    records = read_local_log(run_dir)
    steps = [r["step"] for r in records if r["kind"] == "metrics" and "train_loss" in r["data"]]
    assert steps[:STEPS_PER_EPOCH] == list(range(1, STEPS_PER_EPOCH + 1))
    assert {"params", "tags", "artifact", "status"} <= {r["kind"] for r in records}
    assert records[-1]["data"] == {"status": "FINISHED"}


def test_the_ray_path_says_in_one_line_that_ray_is_missing(children):
    child, tmp_path = children["ray"]
    done = child.result()
    assert done.returncode == 2
    assert done.stderr.strip() == ("ranray train: the ray runtime needs the module 'ray', which is not installed; "
                                   "install the training system (pip install 'ranray[train]'), or run on this "
                                   "machine with --local")
    assert not (tmp_path / "ray").exists()
