"""Attention vs occlusion (ranray.train.occlusion): covering a region lowers its self-attention weight.

Two models: a hand-built RAN whose mu is known (a backbone that reports each crop's contrast, an
alpha head that turns contrast into weight: a covered, flat region must lose its weight, the others
keep theirs), and a tiny RAN really trained on the learnable fixture set (the class is a coloured
patch inside the centre-bottom region: the model must weigh that region most, and covering it must
lower its weight and cost the accuracy, covering a top region much less).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from train_fixtures import NUM_CLASSES, learnable_dataset, tiny_config

from ranray.config import ModelConfig
from ranray.data.loader import build_loader
from ranray.models.ran import RegionAttentionNetwork
from ranray.tracking import list_artifacts
from ranray.train.occlusion import cover_box, measure_attention_shift, measure_trained, report_trained


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


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return learnable_dataset(tmp_path_factory.mktemp("data") / "ds")


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


def test_trained_ran_attends_to_the_class_region_and_loses_it_covered(ray_session, data_dir, tmp_path):
    from ranray.train.launch import run_training

    cfg = tiny_config(data_dir, tmp_path / "runs", "occlusion", "model.num_regions=4", "epochs=3",
                      "checkpoint.every_n_steps=0")
    result = run_training(cfg)
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
