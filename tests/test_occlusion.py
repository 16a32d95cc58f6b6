"""Attention vs occlusion (bench/_occlusion_probe.py, the occlusion study's probe): covering a region lowers its self-attention weight;
each region's share of the decision per subset; and the occlusion study (bench/occlusion.py) end to end.

Two models: a hand-built RAN whose mu is known (a backbone that reports each crop's contrast, an
alpha head that turns contrast into weight: a covered, flat region must lose its weight, the others
keep theirs), and a tiny RAN really trained on the learnable fixture set (the class is a coloured
patch inside the centre-bottom region: the model must weigh that region most, and covering it must
lower its weight and cost the accuracy, covering a top region much less).

The study runs on the same fixture set (prepared shards with occlusion / pose30 / pose45 flags, as
the real FERPlus prepared with RAN's lists), as a smoke run: 1 seed, whole_face and ran, 2 steps.
Both trainings run through the local runtime (one worker, this process): what is measured is the
model and the study's bookkeeping, not Ray.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from train_fixtures import NUM_CLASSES, tiny_config

from ranray.config import ModelConfig, save_config
from ranray.data.loader import build_loader
from ranray.data.schema import FLAG_OCCLUSION, FLAG_POSE30, FLAG_POSE45, SUBSET_MASK
from ranray.models.ran import RegionAttentionNetwork
from ranray.tracking import list_artifacts
from ranray.train.metrics import mean_class_accuracy, per_class_from_confusion
from ranray.train.plots import region_shares

BENCH = Path(__file__).resolve().parents[1] / "bench" / "occlusion.py"
sys.path.insert(0, str(BENCH.parent))  # the probe is the study's own module, not the package's
from _occlusion_probe import (SHARE_SUBSETS, cover_box, measure_attention_shift,  # noqa: E402
                              measure_region_shares, measure_trained, report_trained)


class ContrastBackbone(nn.Module):
    """Features (std of the crop's pixels, 1): a flat (covered) crop has contrast 0."""

    embedding_size = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = x.flatten(1).std(dim=1)
        return torch.stack([std, torch.ones_like(std)], dim=1)


def contrast_ran(num_regions: int = 4) -> RegionAttentionNetwork:
    net = RegionAttentionNetwork(ModelConfig(backbone="iresnet_tiny", num_regions=num_regions,
                                             num_classes=NUM_CLASSES), backbone=ContrastBackbone())
    with torch.no_grad():  # mu = sigmoid(12 * contrast - 3): ~1 on a face crop, sigmoid(-3) = 0.047 when flat
        net.alpha.weight.copy_(torch.tensor([[12.0, 0.0]]))
        net.alpha.bias.fill_(-3.0)
    return net.eval()


def test_cover_box_fills_exactly_the_box():
    images = torch.ones(2, 3, 8, 8)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.5, 1.0, 1.0]])
    out = cover_box(images, boxes, fill=0.0)
    assert out[0, :, :4, :4].abs().sum() == 0 and out[0, :, 4:, :].min() == 1 and out[0, :, :, 4:].min() == 1
    assert out[1, :, 4:, 2:].abs().sum() == 0 and out[1, :, :4].min() == 1 and out[1, :, :, :2].min() == 1
    assert torch.equal(images, torch.ones(2, 3, 8, 8))  # the input is not touched


def test_covering_a_region_lowers_its_known_weight(data_dir):
    net = contrast_ran(num_regions=4)
    loader = build_loader(data_dir, "test", batch_size=8, backend="torch", num_threads=0)
    shift = measure_attention_shift(net, loader, use_landmarks=False)
    rows = {r["region"]: r for r in shift.summary()}
    assert sorted(rows) == [1, 2, 3] and shift.faces == 16  # the 32 test rows, the 16 without a subset flag
    for k, r in rows.items():
        assert r["clean_mu"] > 0.9, (k, r)
        # The covered crop is flat up to its bilinear border: its weight falls to about sigmoid(-3) ...
        assert -0.95 < r["own_mean"] < -0.6 and r["own_std"] < 0.15 and r["own_fell"] == 1.0, (k, r)
        # ... the others only lose the part they share with it.
        assert r["others_mean"] > r["own_mean"] + 0.4, (k, r)
        assert r["whole_mean"] > r["own_mean"] + 0.4, (k, r)
    headers, table = shift.table()
    assert len(table) == 3 and len(table[0]) == len(headers)


def test_a_whole_face_model_is_refused(data_dir):
    net = RegionAttentionNetwork(ModelConfig(backbone="iresnet_tiny", variant="whole_face", num_classes=NUM_CLASSES),
                                 backbone=ContrastBackbone())
    loader = build_loader(data_dir, "test", batch_size=8, backend="torch", num_threads=0)
    with pytest.raises(ValueError, match="no regions to cover"):
        measure_attention_shift(net, loader, use_landmarks=False)


def test_trained_ran_attends_to_the_class_region_and_loses_it_covered(data_dir, tmp_path):
    from ranray.train.launch import run_training

    cfg = tiny_config(data_dir, tmp_path / "runs", "occlusion", "model.num_regions=4", "epochs=3",
                      "checkpoint.every_n_steps=0", "scaling.num_workers=1")
    result = run_training(cfg, runtime="local")
    shift = measure_trained(result.best_model, data_dir, "test")
    again, files = report_trained(result.best_model, data_dir, tmp_path / "shift", tracking_uri=result.tracking_uri,
                                  mlflow_run_id=result.mlflow_run_id)
    assert again.summary() == shift.summary()  # the same faces, the same model: the same figures
    assert json.loads(files["json"].read_text())["regions"] == shift.summary()
    assert {"plots/attention_shift.json", "plots/attention_shift.png"} <= set(
        list_artifacts(result.tracking_uri, result.mlflow_run_id))
    rows = {r["name"]: r for r in shift.summary()}
    assert set(rows) == {"top-left", "top-right", "centre-bottom"} and shift.faces == 16
    assert shift.clean_accuracy >= 0.75
    # The model attends most to the region that holds the class ...
    assert rows["centre-bottom"]["clean_mu"] > max(rows["top-left"]["clean_mu"], rows["top-right"]["clean_mu"])
    # ... covering it lowers its weight on (nearly) every face, more than the others', and costs the accuracy,
    mouth = rows["centre-bottom"]
    assert mouth["own_mean"] < -0.1 and mouth["own_fell"] >= 0.75 and mouth["own_mean"] < mouth["others_mean"], mouth
    assert mouth["accuracy_covered"] <= 0.5, mouth
    # ... while covering a region without the class costs less (a flat card there even draws weight:
    # docs/OCCLUSION.md).
    for name in ("top-left", "top-right"):
        assert rows[name]["accuracy_covered"] >= mouth["accuracy_covered"] + 0.2, rows[name]
    for r in rows.values():
        assert math.isfinite(r["own_std"]) and 0.0 < r["clean_mu"] < 1.0
    with Image.open(files["png"]) as img:  # 4 clean faces x (clean + 3 covered regions)
        assert img.size == (int(1.9 * 4 * 100), int(2.0 * 4 * 100))
        assert np.asarray(img.convert("L")).std() > 10  # faces drawn, not a blank canvas


# ---------------------------------------------------------------------------------------------
# Each region's share of the decision, per subset
# ---------------------------------------------------------------------------------------------


def test_region_shares_per_subset_match_the_faces_of_each_subset(data_dir):
    net = contrast_ran(num_regions=4)
    loader = build_loader(data_dir, "test", batch_size=8, backend="torch", num_threads=0)
    shares = measure_region_shares(net, loader, use_landmarks=False, region_names=["a", "b", "c", "d"])
    # The fixture's flags cycle with the row number (shard_fixtures._row_flags): of 32 test rows,
    # every 4th occluded, every 3rd turned > 30, every 6th > 45, 16 with no flag.
    assert shares.faces == {"all": 32, "clean": 16, "occlusion": 8, "pose30": 11, "pose45": 6}
    means = shares.means()
    assert list(means) == list(SHARE_SUBSETS)
    # The same figures straight from the model's mu and nu, face by face.
    batches = list(loader)
    with torch.no_grad():
        outs = [net(b["images"].float()) for b in batches]
    per_face = region_shares(np.concatenate([o.mu.double().numpy() for o in outs]),
                             np.concatenate([o.nu.double().numpy() for o in outs]))
    flags = np.concatenate([b["flags"].numpy() for b in batches])
    wanted = {"all": flags >= 0, "clean": (flags & SUBSET_MASK) == 0, "occlusion": (flags & FLAG_OCCLUSION) != 0,
              "pose30": (flags & FLAG_POSE30) != 0, "pose45": (flags & FLAG_POSE45) != 0}
    for subset, rows in wanted.items():
        np.testing.assert_allclose(list(means[subset].values()), per_face[rows].mean(0), atol=1e-9)
        assert sum(means[subset].values()) == pytest.approx(1.0, abs=1e-9), subset
    name, top = shares.largest()
    assert top == max(means["all"].values()) and means["all"][name] == top
    headers, rows = shares.table()
    assert headers[0] == "region" and [r[0] for r in rows] == ["a", "b", "c", "d"] and len(rows[0]) == 6


def test_mean_class_accuracy_weighs_classes_equally_and_leaves_out_absent_ones():
    # recalls 1.0 (2 of 2) and 0.25 (1 of 4); the third class has no face: (1.0 + 0.25) / 2, not 3 of 6
    cm = np.array([[2, 0, 0], [3, 1, 0], [0, 0, 0]])
    assert mean_class_accuracy(cm) == pytest.approx(0.625)
    assert math.isnan(mean_class_accuracy(np.zeros((3, 3), dtype=np.int64)))


# ---------------------------------------------------------------------------------------------
# bench/occlusion.py
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("bench_occlusion", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is executed
    path = list(sys.path)
    spec.loader.exec_module(module)
    sys.path[:] = path  # it puts bench/ first (for _results): its train.py, model.py must not shadow anything
    yield module
    sys.modules.pop(spec.name, None)


def test_study_epochs_per_variant_and_refused_overrides(study):
    def epochs(*argv):
        args = study.parse_args(list(argv))
        return study.build_study(args, study.resolve_size(args)).epochs

    # Equal epochs, the 4x baseline, and the whole face at a given (equal-time) number of epochs.
    assert epochs("--variants", "ran,whole_face_4x", "--variant-epochs", "whole_face_eqtime=7") == {
        "whole_face": 4, "ran": 4, "whole_face_4x": 16, "whole_face_eqtime": 7}
    assert epochs("--epochs", "2", "--variant-epochs", "ran=3,no_relation=5", "--variants", "ran") == {
        "whole_face": 2, "ran": 3, "no_relation": 5}
    with pytest.raises(SystemExit, match="whole_face_eqtime needs its epochs"):
        epochs("--variants", "whole_face_eqtime")
    with pytest.raises(SystemExit, match="sets epochs itself; use --epochs"):
        epochs("epochs=3")
    with pytest.raises(SystemExit, match="not NAME=N"):
        epochs("--variant-epochs", "whole_face_eqtime=0")


def test_a_row_belongs_to_the_study_whose_config_it_trained(study, tmp_path):
    """Rows are matched by the config their variant resolves to: a row made before the job file changed
    (another digest), or before rows carried a digest, is not taken for today's job."""
    args = study.parse_args(["--variants", "ran,ran_crops,ran_pooled"])
    default = study.build_study(args, study.resolve_size(args))
    current = default.identity("ran_pooled", 1) | {"clean": 0.9}
    stale = default.identity("ran", 0) | {"config": "0123456789ab", "clean": 0.5}
    legacy = {"variant": "whole_face", "seed": 0, "epochs": 4, "train": 800, "clean": 0.8}
    log = tmp_path / "runs.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in (current, stale, legacy)))
    assert study.load_runs(log, default) == {("ran_pooled", 1): current}
    # The variant's overrides are part of its config: ran_crops and ran_pooled differ, ran (the job as it is)
    # is one of the two.
    digests = {v: default.config_digest(v) for v in ("ran", "ran_crops", "ran_pooled")}
    assert digests["ran_crops"] != digests["ran_pooled"] and digests["ran"] in (digests["ran_crops"], digests["ran_pooled"])


def run_study(study, tmp_path, data_dir, *extra):
    return study.main(["--data", str(data_dir), "--job", str(tmp_path / "job.yaml"), "--variants", "whole_face,ran",
                       "--seeds", "1", "--workdir", str(tmp_path / "study"), "--attention-faces", "8",
                       "--no-results", "protocol=ran", "max_steps=2", *extra])


def test_study_on_a_prepared_set_with_subset_flags(ray_session, study, data_dir, tmp_path, capsys):
    job = tiny_config(data_dir, tmp_path / "unused", "job", "checkpoint.every_n_steps=0", "scaling.num_workers=1")
    save_config(job, tmp_path / "job.yaml")
    assert run_study(study, tmp_path, data_dir, "--runtime", "local") == 0
    log = tmp_path / "study" / "runs.jsonl"
    rows = {r["variant"]: r for r in map(json.loads, log.read_text().splitlines())}
    assert sorted(rows) == ["ran", "whole_face"]
    for variant, r in rows.items():
        assert r["seed"] == 0 and r["epochs"] == 2 and r["protocol"] == "ran" and r["steps"] == 2, r
        assert r["data"] == str(data_dir.resolve()) and r["overrides"] == ["protocol=ran", "max_steps=2"]
        for key in ("all", "mean_class", "clean", "occluded", "pose30", "pose45"):
            assert 0.0 <= r[key] <= 1.0, (variant, key, r[key])
        # max_steps=2 stops inside the first epoch (train + val: 128 faces, 16 steps of 1 x 8): none completed
        assert r["train_s"] > 0 and r["faces_per_s"] > 0 and r["load"] >= 0 and r["epochs_trained"] == 0
        # mean class: the mean of the per-class recalls of the evaluation's confusion matrix
        saved = json.loads((Path(r["run_dir"]) / "eval_test" / "eval_test.json").read_text())
        assert r["mean_class"] == pytest.approx(np.nanmean(per_class_from_confusion(np.array(saved["confusion"]))))
        assert r["all"] == saved["metrics"]["test_accuracy"]
    assert "region_shares" not in rows["whole_face"]  # one region: nothing to share
    ran = rows["ran"]
    assert ran["region_faces"] == {"all": 32, "clean": 16, "occlusion": 8, "pose30": 11, "pose45": 6}
    assert set(ran["region_shares"]) == set(SHARE_SUBSETS)
    for subset, shares in ran["region_shares"].items():
        assert list(shares) == ["whole face", "top-left", "top-right"], subset
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5), subset
        assert all(0.0 < x < 1.0 for x in shares.values())
    assert ran["largest_share"] == max(ran["region_shares"]["all"].values())
    assert ran["region_shares"]["all"][ran["largest_region"]] == ran["largest_share"]
    assert math.isfinite(ran["mu_own"]) and 0.0 <= ran["mu_own_fell"] <= 1.0
    assert "| region | all (32 faces) | clean (16 faces) | occlusion (8 faces)" in capsys.readouterr().out

    # Resumed: the runs in the log are not trained again; the table is theirs.
    assert run_study(study, tmp_path, data_dir) == 0
    assert len(log.read_text().splitlines()) == 2
    table = capsys.readouterr().out
    assert "| variant | seeds | epochs | test % | mean class % | occlusion % | pose>30 % | pose>45 %" in table
    assert "| whole_face | 1 | 2 |" in table and "| ran | 1 | 2 |" in table
    assert "(source fixture; rows train 96, val 32, test 32)" in table and "protocol ran: the last epoch" in table
    # Where the attention went, per subset: one row each, the run's own shares (one seed: std 0)
    shares_all = ran["region_shares"]["all"]
    assert ("| ran | all | " + " | ".join(f"{x:.2f} +- 0.00" for x in shares_all.values()) + " |") in table
    assert "| variant | test faces | whole face | top-left | top-right |" in table
    assert "| ran | pose45 |" in table and "| whole_face | all |" not in table
    # --table-only matches the command line: another protocol's table has no runs yet.
    assert run_study(study, tmp_path, data_dir, "--table-only", "protocol=clean") == 0
    assert "| ran |" not in capsys.readouterr().out
