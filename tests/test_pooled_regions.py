"""model.region_features=pooled: region features from one backbone pass (each box resampled from the last
feature map), against the paper's crops; the checkpoint's mode; and the inference paths on a pooled model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from train_fixtures import calibrated, first_face_file, tiny_config

from ranray.cli import main
from ranray.config import ConfigError, ModelConfig
from ranray.inference import load_trained_model
from ranray.models import RegionAttentionNetwork, build_ran, expression_loss, region_biased_loss
from ranray.models.ran import crop_regions
from ranray.train.checkpoint import export_model


def tiny(features: str, seed: int = 0, **kw) -> RegionAttentionNetwork:
    torch.manual_seed(seed)
    kw.setdefault("input_size", 64)
    return RegionAttentionNetwork(ModelConfig(backbone="iresnet_tiny", region_features=features, **kw))


# ---------------------------------------------------------------------------------------------
# What a pooled region is
# ---------------------------------------------------------------------------------------------


def test_a_box_reads_its_cells_of_the_map_at_the_maps_own_size():
    """A ramp map (cell value = its column): the left half box [0, 0.5] of a 4-cell map, read at 4 cells,
    samples at 0.25, 0.75, 1.25, 1.75 cells from the edge, i.e. 0.25 cells before cell 0's centre (clamped
    at the border), then a quarter and three quarters of the way from cell 0 to 1, and a quarter past
    cell 1; the whole-map box gives the map back unchanged."""
    ramp = torch.arange(4.0).expand(1, 1, 4, 4).clone()
    left = crop_regions(ramp, torch.tensor([[[0.0, 0.0, 0.5, 1.0]]]), 4)[0, 0, 0, 0]
    torch.testing.assert_close(left, torch.tensor([0.0, 0.25, 0.75, 1.25]), rtol=0, atol=1e-6)
    whole = crop_regions(ramp, torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]), 4)[0, 0]
    torch.testing.assert_close(whole, ramp[0], rtol=0, atol=0)


def test_region_zero_is_exactly_the_whole_face_network():
    x = torch.randn(3, 3, 112, 112)
    pooled = calibrated(tiny("pooled", num_regions=6), x)
    whole = tiny("crops", variant="whole_face")
    whole.load_state_dict(pooled.state_dict() | {"region_features_code": whole.region_features_code}, strict=True)
    whole.eval()
    feats = []
    pooled.backbone.features.register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        pooled(x)
        face = crop_regions(x, torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]).expand(3, 1, 4), 64)[:, 0]
        expected = whole.backbone(face)
    region_feats = feats[0].view(3, 6, -1)
    # Equal up to the fc's rounding, which differs between a batch of B*K rows and one of B.
    torch.testing.assert_close(region_feats[:, 0], expected, rtol=1e-5, atol=1e-5)
    # The part regions read other cells: their features differ from the whole face's.
    assert (region_feats[:, 1:] - region_feats[:, :1]).abs().amax() > 1e-3


@pytest.mark.parametrize("k", [2, 6])
def test_one_backbone_pass_per_face_and_one_head_per_region(k):
    net = tiny("pooled", num_regions=k)
    stages, heads = [], []
    net.backbone.layer1.register_forward_hook(lambda m, i, o: stages.append(i[0].shape[0]))
    net.backbone.fc.register_forward_hook(lambda m, i, o: heads.append(i[0].shape[0]))
    with torch.no_grad():
        out = net(torch.randn(2, 3, 112, 112))
    assert stages == [2] and heads == [2 * k]
    assert out.logits.shape == (2, 8) and out.mu.shape == (2, k) and out.nu.shape == (2, k)


def test_crops_mode_is_unchanged_one_folded_backbone_call_over_the_crops():
    x = torch.randn(2, 3, 112, 112)
    net = calibrated(tiny("crops", num_regions=6), x)
    with torch.no_grad():
        out = net(x)
        crops = net.regions(x)
        mu, nu, p = net.attend(net.backbone(crops.flatten(0, 1)).view(2, 6, -1))
    for got, want in ((out.logits, net.classify(p)), (out.mu, mu), (out.nu, nu)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert int(net.region_features_code) == 0


@pytest.mark.parametrize("mode, kw", [("fixed", {}), ("landmark", {"num_regions": 5}), ("random", {})])
def test_every_region_mode_trains_through_pooled_regions(mode, kw):
    """Gradients reach the stem, the last stage, the head and both attention heads; a few steps fit 8 faces."""
    net = tiny("pooled", region_mode=mode, **kw).train()
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 112, 112), torch.arange(8) % 4
    lm = (torch.rand(8, 68, 2) * 80 + 16) if mode == "landmark" else None
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = net(x, lm)
        loss = expression_loss(out.logits, y, None) + region_biased_loss(out.mu, margin=0.1)
        opt.zero_grad()
        loss.backward()
        if not losses:
            for name in ("backbone.conv1.weight", "backbone.layer4.0.conv2.weight", "backbone.fc.weight",
                         "alpha.weight", "beta.weight", "classifier.weight"):
                g = net.get_parameter(name).grad
                assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_landmark_boxes_move_what_the_regions_read():
    net = tiny("pooled", region_mode="landmark", num_regions=3).eval()
    x = torch.randn(1, 3, 112, 112)
    lm = torch.full((1, 68, 2), 40.0)
    with torch.no_grad():
        a = net(x, lm).mu
        b = net(x, lm + 30.0).mu
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.equal(a[:, 1:], b[:, 1:])


def test_bf16_autocast_stays_close_to_fp32():
    x = torch.randn(4, 3, 112, 112)
    net = calibrated(tiny("pooled", num_regions=6), x)
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x)
    assert low.logits.dtype == torch.float32 and torch.isfinite(low.logits).all()
    torch.testing.assert_close(low.mu, ref.mu, rtol=0, atol=0.05)


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, smallest", [
    ({"input_size": 64, "crop_frac": 0.2}, r"0\.80 cells wide, under one cell.*crop_frac 0\.25, model\.input_size 80"),
    ({"input_size": 64, "crop_frac": 0.3, "region_mode": "random"}, r"0\.96 cells wide.*crop_frac 0\.313, "
                                                                      r"model\.input_size 80"),
    ({"input_size": 16, "crop_frac": 1.0}, r"0\.85 cells wide.*work: model\.input_size 32"),  # 0.85: no crop_frac
])
def test_a_box_under_one_cell_of_the_last_map_is_refused_naming_crop_frac(kw, smallest):
    with pytest.raises(ConfigError, match=r"config key 'model.crop_frac'.*" + smallest):
        tiny("pooled", **kw)
    tiny("crops", **kw)  # crops resample from the image: any size works


def test_unknown_region_features_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"'model.region_features': unknown region_features 'roi'; known: crops, "
                                          r"pooled"):
        tiny("roi")


def test_weights_of_one_mode_are_refused_by_the_other_and_old_weights_are_crops():
    pooled, crops = tiny("pooled"), tiny("crops")
    with pytest.raises(ValueError, match=r"trained with model.region_features=pooled and this model is built with "
                                         r"model.region_features=crops"):
        crops.load_state_dict(pooled.state_dict())
    with pytest.raises(ValueError, match=r"trained with model.region_features=crops.*built with "
                                         r"model.region_features=pooled"):
        pooled.load_state_dict(crops.state_dict())
    old = {k: v for k, v in crops.state_dict().items() if k != "region_features_code"}
    tiny("crops", seed=1).load_state_dict(old, strict=True)  # weights saved before the mode existed
    with pytest.raises(ValueError, match=r"trained with model.region_features=crops"):
        pooled.load_state_dict(old)


# ---------------------------------------------------------------------------------------------
# The inference paths on a pooled model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pooled_model(tmp_path_factory, data_dir) -> Path:
    cfg = tiny_config(data_dir, tmp_path_factory.mktemp("runs"), "pooled", "model.region_features=pooled")
    torch.manual_seed(0)
    path, _ = export_model(build_ran(cfg.model).state_dict(), cfg, tmp_path_factory.mktemp("model") / "best.pt")
    return path


def test_the_exported_model_records_its_mode_and_a_swapped_config_is_refused(pooled_model, tmp_path, capsys):
    assert load_trained_model(pooled_model).cfg.model.region_features == "pooled"
    swapped = tmp_path / "best.pt"
    swapped.write_bytes(pooled_model.read_bytes())
    cfg = yaml.safe_load(pooled_model.with_suffix(".yaml").read_text())
    cfg["model"]["region_features"] = "crops"
    swapped.with_suffix(".yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"trained with model.region_features=pooled.*built with "
                                         r"model.region_features=crops"):
        load_trained_model(swapped)


def test_evaluate_with_attention_pictures_on_a_pooled_model(pooled_model, data_dir, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(pooled_model), "--data", str(data_dir), "--split", "test",
                 "--out", str(tmp_path), "--attention", "2"]) == 0
    saved = json.loads((tmp_path / "eval_test.json").read_text())
    assert saved["metrics"]["test_samples"] > 0
    pictures = sorted(tmp_path.rglob("*attention*.png"))
    assert pictures and all(p.stat().st_size > 10_000 for p in pictures), pictures


def test_predict_draws_the_pooled_regions_boxes(pooled_model, data_dir, tmp_path, capsys):
    face = first_face_file(data_dir, tmp_path / "face.png")
    assert main(["predict", "--checkpoint", str(pooled_model), "--detector", "given", "--out",
                 str(tmp_path / "out"), "--json", str(face)]) == 0
    (pred,) = json.loads(capsys.readouterr().out)
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    regions = pred["attention"]
    assert [a["region"] for a in regions] == ["whole face", "top-left", "top-right"]
    # The boxes drawn are the boxes the regions were pooled from: the whole face and the fixed 0.6 squares.
    side = 112
    assert regions[0]["box"] == pytest.approx([0, 0, side, side], abs=0.5)
    assert regions[1]["box"] == pytest.approx([0, 0, 0.6 * side, 0.6 * side], abs=0.5)
    assert all(0.0 < a["mu"] < 1.0 for a in regions)
    assert (tmp_path / "out" / "face_ran.png").is_file()
