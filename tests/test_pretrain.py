"""Pretraining end to end on synthetic identities: 2 Ray Train workers (gloo), Partial FC, a fault
and a resume, verification per epoch, and the backbone hand-over to RAN fine-tuning.

The identity set comes from the synthetic generator (`ranray.data.synth`, identity format) and its
own source reader; its faces are drawn aligned at 112 px, so the shards are written here directly
instead of through `ranray prepare`'s dlib alignment (tested in test_prepare).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import shutil
from concurrent.futures import Future
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from concurrent_runs import run_together
from mlflow_reads import metric_history
from source_readers import read_identity
from step_hooks import RESHARD_DIR, committed_steps

from ranray.cli import main as cli_main
from ranray.config import ConfigError, ModelConfig, PretrainConfig, load_config
from ranray.data.schema import REJECT_SCHEMA, SCHEMA_VERSION, SHARD_SCHEMA
from ranray.data.synth import SynthOptions, synthesize
from ranray.models import build_ran, create_model
from ranray.models.partial_fc import shard_range
from ranray.train.checkpoint import load_checkpoint
from ranray.failures import RunFailed
from ranray.train.launch import run_pretraining
from ranray.train.pretrain import preflight
from ranray.run_dir import RunDir

JOB = Path(__file__).resolve().parents[1] / "jobs" / "pretrain_r50.yaml"
IDENTITIES, PER_IDENTITY = 30, 8  # 24 train identities (192 images), 6 held out for 200 pairs


def _write_shards(root: Path, out: Path) -> Path:
    """The identity reader's rows as a prepared dataset (JPEG bytes, identity labels)."""
    read = read_identity([str(root)])
    splits = {}
    for split in ("train", "val"):
        rows = [r for r in read.rows if r.split == split]
        buf = []
        for r in rows:
            jpeg = io.BytesIO()
            Image.open(r.path).convert("RGB").save(jpeg, "JPEG", quality=92)
            buf.append({"key": r.key, "image": jpeg.getvalue(), "label": r.label, "target": [], "votes": [],
                        "landmarks": [], "split": split, "flags": 0, "source": "identity"})
        (out / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(buf, schema=SHARD_SCHEMA), out / split / "part-00000.parquet",
                       row_group_size=32)
        splits[split] = {"rows": len(rows), "per_class": [], "shards": 1}
    pq.write_table(pa.Table.from_pylist([], schema=REJECT_SCHEMA), out / "rejects.parquet")
    total = sum(s["rows"] for s in splits.values())
    (out / "manifest.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "source": "identity", "num_classes": len(read.class_names),
        "class_names": read.class_names, "label_mode": "majority", "splits": splits, "rows_in": total,
        "rows_written": total, "rows_rejected": 0, "rejects_by_reason": {}, "config": {}, "code_version": "test",
        "created": dt.datetime.now(dt.timezone.utc).isoformat()}))
    shutil.copyfile(root / "pairs.txt", out / "pairs.txt")
    return out


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("faces")
    opts = SynthOptions(format="identity", n=IDENTITIES * PER_IDENTITY, per_identity=PER_IDENTITY, seed=3,
                        occlusion_frac=0.0, large_pose_frac=0.0, pairs=200)
    synthesize(tmp / "raw", opts)
    return _write_shards(tmp / "raw", tmp / "prepared")


def _overrides(data_dir: Path, storage: Path, **extra: object) -> list[str]:
    values = {"data.dir": str(data_dir), "run.storage_path": str(storage), "run.name": "pt", "backbone": "iresnet_tiny",
              "partial_fc.embedding_size": 64, "partial_fc.sample_rate": 0.5, "scaling.num_workers": 2,
              "scaling.use_gpu": False, "scaling.cpus_per_worker": 1, "data.loader": "torch", "data.num_threads": 0,
              "optim.milestones": [0.8], "checkpoint.every_n_steps": 4, "checkpoint.max_failures": 1,
              "epochs": 4, "batch_size": 16, "margin.scale": 32.0, "margin.m2": 0.3, **extra}
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _config(data_dir: Path, storage: Path, **extra: object) -> PretrainConfig:
    return load_config(PretrainConfig, JOB, _overrides(data_dir, storage, **extra))


# ---------------------------------------------------------------------------------------------
# Preflight: defined refusals before any worker starts
# ---------------------------------------------------------------------------------------------


def test_preflight_takes_classes_and_pairs_from_the_dataset(faces, tmp_path):
    plan = preflight(_config(faces, tmp_path))
    assert plan.num_classes == 24 and plan.pairs_file.endswith("pairs.txt")


def test_wrong_num_classes_is_refused(faces, tmp_path):
    with pytest.raises(ConfigError, match="'num_classes' is 100 but .* has 24"):
        preflight(_config(faces, tmp_path, num_classes=100))


def test_pairs_with_unknown_keys_or_missing_file_are_refused(faces, tmp_path):
    bad = tmp_path / "pairs.txt"
    bad.write_text("val/id00029/000.png train/id00000/000.png 0\n")
    with pytest.raises(ConfigError, match="not in split 'val'"):
        preflight(_config(faces, tmp_path, verification_pairs=str(bad)))
    with pytest.raises(ConfigError, match="does not exist"):
        preflight(_config(faces, tmp_path, verification_pairs=str(tmp_path / "nope.txt")))


def test_embedding_size_must_match_what_fine_tuning_rebuilds(faces, tmp_path):
    with pytest.raises(ConfigError, match="embeds in 64"):
        preflight(_config(faces, tmp_path, **{"partial_fc.embedding_size": 128}))


# ---------------------------------------------------------------------------------------------
# `ranray pretrain --local`: the pretraining task on the local runtime, in this process
# ---------------------------------------------------------------------------------------------


def test_pretrain_local_runs_a_few_steps_in_this_process(faces, tmp_path, capsys):
    overrides = _overrides(faces, tmp_path, **{"scaling.num_workers": 1, "epochs": 1, "max_steps": 3,
                                               "checkpoint.every_n_steps": 2})
    assert cli_main(["pretrain", "--local", "--config", str(JOB), *overrides]) == 0
    assert "verification accuracy (last / best)" in capsys.readouterr().out
    run_dir = RunDir(tmp_path / "pt")
    assert sorted(p.name for p in run_dir.root.glob("checkpoint_*")) == ["checkpoint_00000002_g00",
                                                                        "checkpoint_00000003_g00"]
    state = load_checkpoint(run_dir / "checkpoint_00000003_g00" / "state.pt")
    assert state["step"] == 3 and state["world_size"] == 1 and state["num_classes"] == 24
    own = load_checkpoint(run_dir / "checkpoint_00000003_g00" / "rank0.pt")
    assert own["partial_fc"]["weight"].shape == (24, 64)  # one rank holds every class centre
    backbone = create_model("iresnet_tiny", num_features=64)
    backbone.load_state_dict(load_checkpoint(run_dir.backbone))  # strict: the hand-over format


# ---------------------------------------------------------------------------------------------
# A real run: 2 workers, a fault at step 9, resume from step 8, 4 epochs
# ---------------------------------------------------------------------------------------------


def _events(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def ray_runs(faces, tmp_path_factory, ray_session) -> dict[str, Future]:
    """The module's Ray runs, two at a time (concurrent_runs), never over the 4 CPUs: the 2-worker
    run with a fault (2 CPUs) beside the 3-worker run that fails for good (1.5), then that run's
    checkpoint resumed on 4 workers (2) and, when the first run has ended, on 2 (1)."""
    storage, tmp = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("elastic")
    return run_together({"run": lambda: _fault_run(faces, storage), "elastic": lambda: _elastic_start(faces, tmp),
                         "4": lambda: _elastic_resume(tmp, 4), "2": lambda: _elastic_resume(tmp, 2)},
                        after={"4": "elastic", "2": "elastic"})


def _fault_run(faces: Path, storage: Path) -> dict:
    hooks = ["step_hooks:PretrainStepsLog", "step_hooks:fail_at_step_9_on_rank_1"]
    overrides = _overrides(faces, storage, **{"run.hooks": hooks})
    assert cli_main(["pretrain", "--config", str(JOB), *overrides]) == 0
    return {"dir": storage / "pt"}


@pytest.fixture(scope="module")
def run(ray_runs) -> dict:
    return ray_runs["run"].result()


def test_resume_restores_each_rank_shard_and_trains_no_step_twice(run):
    steps_per_epoch = 192 // (2 * 16)
    for rank in range(2):
        log = run["dir"] / "steps" / f"rank{rank}.log"
        events = _events(log)
        shards = [e for e in events if e[0] == "shard"]
        saved = {int(e[1]): e[2] for e in events if e[0] == "saved"}
        starts = [e for e in events if e[0] == "start"]
        assert [s[1:] for s in starts] == [["0", "0"], ["1", "8"]]  # a restart from the step-8 checkpoint
        assert all((int(s[1]), int(s[2])) == shard_range(24, 2, rank) for s in shards)
        assert shards[1][3] == saved[8] != shards[0][3]  # the restored centres are the ones saved at step 8
        lineage = [step for step, _, _ in committed_steps(log)]
        assert lineage == list(range(1, 4 * steps_per_epoch + 1))


def test_loss_falls_and_verification_beats_chance(run):
    record = json.loads((run["dir"] / "tracking.json").read_text())  # the MLflow run of this run dir
    uri, run_id = record["tracking_uri"], record["run_id"]
    losses = [v for _, v in metric_history(uri, run_id, "epoch_train_loss")]
    accuracy = [v for _, v in metric_history(uri, run_id, "verify_accuracy")]
    assert len(accuracy) >= 4 and losses[-1] < 0.8 * losses[0]
    assert max(accuracy) > 0.6


def test_backbone_hands_over_strictly_to_fine_tuning(run):
    path = RunDir(run["dir"]).backbone
    state = torch.load(path, weights_only=True)
    create_model("iresnet_tiny").load_state_dict(state, strict=True)
    assert not any(k.startswith("module.") for k in state)
    ran = build_ran(ModelConfig(backbone="iresnet_tiny", num_classes=8, init_backbone=str(path)))
    torch.testing.assert_close(ran.backbone.conv1.weight, state["conv1.weight"])


# ---------------------------------------------------------------------------------------------
# Elastic: a checkpoint of 3 workers resumed on 2 and on 4 (Partial FC re-cut, docs/ELASTIC.md)
# ---------------------------------------------------------------------------------------------


def _elastic_config(data_dir: Path, storage: Path, workers: int) -> PretrainConfig:
    # 192 rows, batch 16: 4 steps per epoch on 3 workers; rank 0 fails after step 3, the
    # checkpoint of step 2 (96 rows of epoch 0 used) is what the other world sizes resume from.
    return _config(data_dir, storage, **{
        "scaling.num_workers": workers, "scaling.cpus_per_worker": 0.5, "checkpoint.every_n_steps": 2,
        "checkpoint.max_failures": 0, "epochs": 2, "log_every_n_steps": 1,
        "run.hooks": ["step_hooks:PretrainStepsLog", "step_hooks:ShardDump", "step_hooks:fail_at_step_3"]})


def _elastic_start(faces: Path, tmp: Path) -> Path:
    """The 3-worker run (tmp/a) that fails after step 3, on the faces without pairs (tmp/faces); tmp."""
    data = tmp / "faces"
    shutil.copytree(faces, data)
    (data / "pairs.txt").unlink()  # no verification: the test is about the head's state
    with pytest.raises(RunFailed):
        run_pretraining(_elastic_config(data, tmp / "a", 3))
    return tmp


def _elastic_resume(tmp: Path, workers: int) -> Path:
    storage = tmp / f"on{workers}"
    shutil.copytree(tmp / "a", storage)  # the same checkpoint, resumed once per new world size
    run_pretraining(_elastic_config(tmp / "faces", storage, workers))
    return storage / "pt"


@pytest.fixture(scope="module")
def elastic(ray_runs) -> dict:
    tmp = ray_runs["elastic"].result()
    dirs = {workers: ray_runs[str(workers)].result() for workers in (2, 4)}
    return {"saved": tmp / "a" / "pt" / "checkpoint_00000002_g00", "dirs": dirs, "data": tmp / "faces"}


def _saved_table(saved: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole class-centre table and its momentum from the 3 ranks' files of one checkpoint."""
    parts = sorted((load_checkpoint(saved / f"rank{r}.pt") for r in range(3)),
                   key=lambda p: p["partial_fc"]["_extra_state"]["class_start"])
    weight = torch.cat([p["partial_fc"]["weight"] for p in parts])
    momentum = torch.cat([p["partial_fc_optimizer"]["state"][0]["momentum_buffer"] for p in parts])
    return weight, momentum


@pytest.mark.parametrize("workers", [2, 4])
def test_three_worker_checkpoint_resumes_on_other_counts_with_every_centre_bit_equal(elastic, workers):
    weight, momentum = _saved_table(elastic["saved"])
    assert weight.shape == momentum.shape == (24, 64) and momentum.abs().sum() > 0
    run_dir = elastic["dirs"][workers]
    dumps = [torch.load(run_dir / RESHARD_DIR / f"g1_rank{r}.pt", weights_only=True) for r in range(workers)]
    assert [tuple(d["range"]) for d in dumps] == [shard_range(24, workers, r) for r in range(workers)]
    for d in dumps:
        lo, hi = d["range"]
        assert d["step"] == 2 and d["world_size"] == workers
        assert torch.equal(d["weight"], weight[lo:hi])  # bit for bit, uneven shards included (24 / 4, 24 / 3, ...)
        assert torch.equal(d["optimizer"]["momentum_buffer"], momentum[lo:hi])


@pytest.mark.parametrize("workers, steps", [(2, 2 + 3 + 6), (4, 2 + 2 + 3)])
def test_the_resumed_run_trains_the_rest_of_the_epoch_and_the_next(elastic, workers, steps):
    """Epoch 0's other 96 rows on the new ranks (3 batches of 16 on 2; 2 of 12 on 4), then a whole epoch."""
    run_dir = elastic["dirs"][workers]
    for rank in range(workers):
        log = run_dir / "steps" / f"rank{rank}.log"
        events = _events(log)
        assert [e[1:] for e in events if e[0] == "start"][-1] == ["1", "2"]
        shard = [e for e in events if e[0] == "shard"][-1]
        saved = {int(e[1]): e[2] for e in events if e[0] == "saved"}
        assert max(saved) == steps and saved[steps] != shard[3]  # the re-cut centres trained on
    record = json.loads((run_dir / "tracking.json").read_text())
    losses = dict(metric_history(record["tracking_uri"], record["run_id"], "train_loss"))
    assert set(range(3, steps + 1)) <= set(losses) and all(math.isfinite(v) for v in losses.values())
    workers_metric = [v for _, v in metric_history(record["tracking_uri"], record["run_id"], "workers")]
    assert workers_metric[-1] == float(workers)  # each start records its group (and its LR factor)
    assert RunDir(run_dir).backbone.is_file()
