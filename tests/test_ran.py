"""Region Attention Network: region crops, attention maths, batch folding, precision, errors."""

from __future__ import annotations

import math

import pytest
import torch

from train_fixtures import calibrated

from ranray.config import ConfigError, ModelConfig
from ranray.models import (RegionAttentionNetwork, build_ran, create_model, expression_loss,
                           region_biased_loss)


def tiny_ran(seed: int = 0, **kw) -> RegionAttentionNetwork:
    torch.manual_seed(seed)
    return RegionAttentionNetwork(ModelConfig(backbone="iresnet_tiny", **kw))


def head_test_ran(num_features: int, **kw) -> RegionAttentionNetwork:
    """A RAN whose backbone emits num_features, seeded: for attend() on hand-made features."""
    torch.manual_seed(0)
    return RegionAttentionNetwork(ModelConfig(backbone="iresnet_tiny", **kw),
                                  backbone=create_model("iresnet_tiny", num_features=num_features))


def ramp_images(b: int = 2, size: int = 112) -> torch.Tensor:
    """Channel 0 = column index, channel 1 = row index: bilinear sampling of it is exact."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([xs, ys, torch.zeros_like(xs)]).expand(b, 3, size, size).clone()


# ---------------------------------------------------------------------------------------------
# Attention maths
# ---------------------------------------------------------------------------------------------


def test_attention_matches_hand_computation():
    net = head_test_ran(2, num_regions=3)
    with torch.no_grad():
        net.alpha.weight.copy_(torch.tensor([[1.0, -1.0]]))
        net.alpha.bias.fill_(0.5)
        net.beta.weight.copy_(torch.tensor([[0.5, 0.0, -1.0, 0.25]]))
        net.beta.bias.fill_(-0.1)
    feats = [[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]

    def sig(z):
        return 1.0 / (1.0 + math.exp(-z))

    mu = [sig(f[0] - f[1] + 0.5) for f in feats]
    f_m = [sum(m * f[j] for m, f in zip(mu, feats)) / sum(mu) for j in range(2)]
    cat = [f + f_m for f in feats]
    nu = [sig(0.5 * c[0] - c[2] + 0.25 * c[3] - 0.1) for c in cat]
    w = [a * b for a, b in zip(mu, nu)]
    p = [sum(wi * c[j] for wi, c in zip(w, cat)) / sum(w) for j in range(4)]
    # The same numbers, written out once so a change in the reference maths shows up too.
    assert mu == pytest.approx([0.8175745, 0.3775407, 0.6224593], abs=1e-7)
    assert p == pytest.approx([1.2913239, 1.0041617, 1.1347503, 0.8926508], abs=1e-7)

    got_mu, got_nu, got_p = net.attend(torch.tensor([feats]))
    torch.testing.assert_close(got_mu, torch.tensor([mu]), rtol=0, atol=1e-6)
    torch.testing.assert_close(got_nu, torch.tensor([nu]), rtol=0, atol=1e-6)
    torch.testing.assert_close(got_p, torch.tensor([p]), rtol=0, atol=1e-6)
    # P_RAN's second half is F_m itself: every region carries the same F_m.
    torch.testing.assert_close(got_p[0, 2:], torch.tensor(f_m), rtol=0, atol=1e-6)


def test_forward_is_attend_over_one_folded_backbone_call_and_matches_a_region_loop():
    net = tiny_ran(num_regions=6)
    x = torch.randn(2, 3, 112, 112)
    net = calibrated(net, x)
    with torch.no_grad():
        out = net(x)
        crops = net.regions(x)
        looped = torch.stack([net.backbone(crops[:, k]) for k in range(6)], dim=1)
        mu, nu, p = net.attend(looped)
        logits = net.classify(p)
    assert out.logits.shape == (2, 8) and out.mu.shape == (2, 6) and out.nu.shape == (2, 6)
    assert out.features.shape == (2, 2 * net.backbone.embedding_size)
    # Eval-mode BN has no batch coupling, so folding and looping compute the same function.
    for a, b in ((out.logits, logits), (out.mu, mu), (out.nu, nu), (out.features, p)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert ((out.mu > 0) & (out.mu < 1)).all() and ((out.nu > 0) & (out.nu < 1)).all()


@pytest.mark.parametrize("k", [2, 4, 6])
def test_one_backbone_call_per_forward_whatever_k(k):
    net = tiny_ran(num_regions=k)
    calls = []
    net.backbone.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    with torch.no_grad():
        net(torch.randn(2, 3, 112, 112))
    assert calls == [2 * k]


def test_gradients_reach_backbone_both_attention_heads_and_classifier():
    net = tiny_ran(num_regions=6).train()
    out = net(torch.randn(2, 3, 112, 112))
    loss = expression_loss(out.logits, torch.tensor([1, 3]), None) + region_biased_loss(out.mu, margin=1.0)
    loss.backward()
    for name in ("backbone.conv1.weight", "backbone.layer1.0.conv1.weight", "backbone.layer4.0.conv2.weight",
                 "backbone.fc.weight", "alpha.weight", "alpha.bias", "beta.weight", "beta.bias",
                 "classifier.weight", "classifier.bias"):
        g = net.get_parameter(name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert net.backbone.features.weight.grad is None  # insightface keeps it frozen


def test_bf16_autocast_is_finite_and_close_to_fp32():
    x = torch.randn(4, 3, 112, 112)
    net = calibrated(tiny_ran(num_regions=6), x)
    seen, embedded = [], []
    net.backbone.layer4.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    net.backbone.register_forward_hook(lambda mod, inp, out: embedded.append(out.dtype))
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x)
    assert seen == [torch.float32, torch.bfloat16]  # the backbone's convolutions really ran in bf16
    assert embedded == [torch.float32, torch.float32]  # its embedding layers in float32, as insightface
    for t in low:
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    # Stated tolerance: bf16 keeps 8 mantissa bits; through the backbone the embedding error
    # stays within a few percent, so attention weights within 0.02 and logits within 5% of range.
    torch.testing.assert_close(low.mu, ref.mu, rtol=0, atol=0.02)
    torch.testing.assert_close(low.nu, ref.nu, rtol=0, atol=0.02)
    scale = ref.logits.abs().max().item()
    assert (low.logits - ref.logits).abs().max().item() <= 0.05 * scale + 1e-3


# ---------------------------------------------------------------------------------------------
# Regions
# ---------------------------------------------------------------------------------------------


def test_whole_face_first_and_fixed_crops_are_exact_bilinear():
    net = tiny_ran(num_regions=6, crop_frac=0.6)
    x = ramp_images()
    crops = net.regions(x)
    assert crops.shape == (2, 6, 3, 112, 112) and crops.dtype == torch.float32
    torch.testing.assert_close(crops[:, 0], x, rtol=0, atol=1e-4)  # region 0 = the image itself

    j = torch.arange(112, dtype=torch.float32)
    c = 0.6
    top_left_x = ((j + 0.5) * c - 0.5).clamp(0, 111)  # source column of output column j
    torch.testing.assert_close(crops[0, 1, 0, 50], top_left_x, rtol=0, atol=1e-3)
    torch.testing.assert_close(crops[0, 1, 1, :, 50], top_left_x, rtol=0, atol=1e-3)
    top_right_x = (1 - c) * 112 + (j + 0.5) * c - 0.5
    torch.testing.assert_close(crops[0, 2, 0, 7], top_right_x.clamp(0, 111), rtol=0, atol=1e-3)
    bottom_y = (1 - c) * 112 + (j + 0.5) * c - 0.5
    torch.testing.assert_close(crops[1, 3, 1, :, 3], bottom_y.clamp(0, 111), rtol=0, atol=1e-3)
    centre_09 = 0.05 * 112 + (j + 0.5) * 0.9 - 0.5
    torch.testing.assert_close(crops[1, 4, 0, 60], centre_09, rtol=0, atol=1e-3)


def test_larger_images_are_resampled_to_the_input_size():
    net = tiny_ran(num_regions=3)
    crops = net.regions(ramp_images(1, 224))
    assert crops.shape == (1, 3, 3, 112, 112)
    j = torch.arange(112, dtype=torch.float32)
    torch.testing.assert_close(crops[0, 0, 0, 10], (j + 0.5) * 2 - 0.5, rtol=0, atol=1e-3)


def test_a_smaller_input_size_resamples_every_region_and_sizes_the_backbone():
    """112-pixel aligned faces in, every region (the whole face too) at 48 pixels through a backbone
    built for 48: the cheap setting for 48-pixel FER2013 faces."""
    net = RegionAttentionNetwork(ModelConfig(backbone="iresnet_tiny", input_size=48, num_regions=6))
    images = ramp_images(2, 112)
    crops = net.regions(images)
    assert crops.shape == (2, 6, 3, 48, 48) and net.backbone.input_size == 48
    j = torch.arange(48, dtype=torch.float32)
    torch.testing.assert_close(crops[0, 0, 0, 10], (j + 0.5) * 112 / 48 - 0.5, rtol=0, atol=1e-3)
    out = net(images)
    assert out.logits.shape == (2, 8) and out.mu.shape == (2, 6)


def test_landmark_regions_centre_on_landmark_groups_and_stay_inside():
    net = tiny_ran(num_regions=5, region_mode="landmark", crop_frac=0.6)
    lm = torch.full((2, 68, 2), 56.0)
    lm[:, 36:42, 0] = 35.0 + torch.tensor([-3.0, -1.0, 1.0, 3.0, 1.0, -1.0])  # image-left eye, mean x 35
    lm[:, 36:42, 1] = 45.0 + torch.tensor([0.0, -1.0, -1.0, 0.0, 1.0, 1.0])  # mean y 45
    lm[:, 48:68] = torch.tensor([56.0, 100.0])  # mouth near the bottom edge
    crops = net.regions(ramp_images(), lm)
    assert crops.shape == (2, 5, 3, 112, 112)
    # The mean of a bilinear ramp crop is its centre, in source pixels.
    assert crops[0, 1, 0].mean().item() == pytest.approx(35.0, abs=1e-3)
    assert crops[0, 1, 1].mean().item() == pytest.approx(45.0, abs=1e-3)
    assert crops[1, 4, 0].mean().item() == pytest.approx(56.0, abs=1e-3)
    # Centred at y=100 a 0.6 box would leave the image; it is moved up to end at the edge
    # (its last rows sample past the last pixel centre and read the border row).
    rows = ((1.0 - 0.6) * 112 + (torch.arange(112.0) + 0.5) * 0.6 - 0.5).clamp(max=111)
    assert crops[1, 4, 1].mean().item() == pytest.approx(rows.mean().item(), abs=1e-3)
    boxes = net.region_boxes(ramp_images(), lm)
    assert (boxes >= 0).all() and (boxes <= 1).all()


def test_random_regions_vary_in_training_and_are_fixed_in_eval():
    torch.manual_seed(0)
    net = tiny_ran(num_regions=6, region_mode="random", crop_frac=0.5)
    fixed = tiny_ran(num_regions=6, region_mode="fixed", crop_frac=0.5)
    x = torch.randn(3, 3, 112, 112)
    net.train()
    a, b = net.region_boxes(x), net.region_boxes(x)
    assert not torch.equal(a, b) and not torch.equal(a[0], a[1])
    side = a[:, 1:, 2] - a[:, 1:, 0]
    torch.testing.assert_close(side, a[:, 1:, 3] - a[:, 1:, 1])  # squares
    assert (side >= 0.4 - 1e-6).all() and (side <= 0.6 + 1e-6).all()
    assert (a >= 0).all() and (a <= 1).all()
    net.eval()
    torch.testing.assert_close(net.region_boxes(x), fixed.region_boxes(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Building and errors
# ---------------------------------------------------------------------------------------------


def test_build_ran_from_model_config_loads_init_backbone(tmp_path):
    torch.manual_seed(5)
    src = create_model("iresnet_tiny")
    path = tmp_path / "pretrained.pth"
    torch.save(src.state_dict(), path)
    model = build_ran(ModelConfig(backbone="iresnet_tiny", num_regions=4, region_mode="random", crop_frac=0.5,
                                  dropout=0.2, num_classes=7, init_backbone=str(path)))
    assert model.cfg.num_regions == 4 and model.cfg.region_mode == "random" and model.cfg.num_classes == 7
    assert model.classifier.out_features == 7 and model.dropout.p == 0.2
    for k, v in src.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k


def test_build_ran_rejects_wrong_shaped_backbone_checkpoint(tmp_path):
    path = tmp_path / "wrong_width.pth"
    torch.save(create_model("iresnet_tiny", num_features=16).state_dict(), path)
    with pytest.raises(ConfigError, match=r"'model.init_backbone'.*wrong_width\.pth.*fc\.weight"):
        build_ran(ModelConfig(backbone="iresnet_tiny", init_backbone=str(path)))


def test_bad_inputs_get_clear_errors():
    net = tiny_ran(num_regions=6)
    with pytest.raises(ValueError, match=r"square and at least 112x112.*64x64"):
        net(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"square.*112x128"):
        net(torch.randn(2, 3, 112, 128))
    with pytest.raises(ValueError, match=r"3 channels.*got 1"):
        net(torch.randn(2, 1, 112, 112))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.randn(3, 112, 112))
    with pytest.raises(ValueError, match=r"normalised floats.*uint8"):
        net(torch.zeros(2, 3, 112, 112, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"landmarks must be \(2, 68, 2\).*\(2, 5, 2\)"):
        net(torch.randn(2, 3, 112, 112), torch.zeros(2, 5, 2))


def test_region_dropout_pools_only_kept_regions_in_training_and_is_off_in_eval():
    net = head_test_ran(4, num_regions=6, region_dropout=0.5)
    feats = torch.randn(400, 6, 4)
    net.eval()
    mu, nu, p_eval = net.attend(feats)
    reference = RegionAttentionNetwork(ModelConfig(backbone="iresnet_tiny", num_regions=6),
                                       backbone=net.backbone)
    reference.load_state_dict(net.state_dict())
    torch.testing.assert_close(p_eval, reference.eval().attend(feats)[2], rtol=0, atol=0)

    net.train()
    torch.manual_seed(1)
    keep = net.region_keep_mask(mu)
    assert torch.all(keep[:, 0] == 1.0)  # the whole face is never dropped
    assert 0.45 < 1.0 - keep[:, 1:].mean().item() < 0.55
    torch.manual_seed(1)
    mu_t, nu_t, p_train = net.attend(feats)
    torch.testing.assert_close(mu_t, mu, rtol=0, atol=0)  # mu and nu come back unmasked
    # The pooling by hand over the kept regions only.
    m = mu * keep
    f_m = (m[..., None] * feats).sum(1) / m.sum(1, keepdim=True)
    fc = torch.cat([feats, f_m[:, None].expand_as(feats)], dim=-1)
    w = m * nu_t
    torch.testing.assert_close(p_train, (w[..., None] * fc).sum(1) / w.sum(1, keepdim=True), rtol=0, atol=1e-6)
    dropped_only_whole = keep[:, 1:].sum(1) == 0
    assert dropped_only_whole.any()
    torch.testing.assert_close(p_train[dropped_only_whole],
                               torch.cat([feats[dropped_only_whole, 0]] * 2, dim=-1), rtol=0, atol=1e-6)


def test_region_dropout_of_the_whole_face_too_keeps_one_region_per_face():
    net = tiny_ran(num_regions=6, region_dropout=0.7, region_dropout_whole_face=True).train()
    torch.manual_seed(2)
    keep = net.region_keep_mask(torch.rand(4000, 6))
    assert torch.all(keep.sum(1) >= 1)
    dropped_whole = 1.0 - keep[:, 0].mean().item()
    assert 0.6 < dropped_whole < 0.7  # 0.7, less the faces that lost all six and kept the whole face
    sole = keep.sum(1) == 1
    # Faces left with one region: kept by chance (0.3 * 0.7**5) or re-kept at random (0.7**6), each region alike
    counts = keep[sole].sum(0)
    assert counts.min() > 0.7 * counts.mean()


def test_attention_dropout_noises_both_heads_in_training_only():
    net = head_test_ran(8, num_regions=3, attention_dropout=0.5)
    feats = torch.randn(4, 3, 8)
    net.eval()
    a = net.attend(feats)
    torch.testing.assert_close(net.attend(feats)[0], a[0], rtol=0, atol=0)
    net.train()
    b, c = net.attend(feats), net.attend(feats)
    assert not torch.equal(b[0], c[0]) and not torch.equal(b[1], c[1])


def test_bad_configs_get_clear_errors():
    with pytest.raises(ValueError, match=r"unknown region_mode 'grid'; known: fixed, landmark, random"):
        RegionAttentionNetwork(ModelConfig(backbone="iresnet_tiny", region_mode="grid"))
    with pytest.raises(ValueError, match=r"'fixed' supports num_regions in 2\.\.6.*got 8"):
        RegionAttentionNetwork(ModelConfig(backbone="iresnet_tiny", num_regions=8))
    with pytest.raises(ValueError, match=r"'landmark' supports num_regions in 2\.\.9.*got 1"):
        RegionAttentionNetwork(ModelConfig(backbone="iresnet_tiny", region_mode="landmark", num_regions=1))
    with pytest.raises(ConfigError, match=r"'model.crop_frac' must be in \(0, 1\]"):
        RegionAttentionNetwork(ModelConfig(backbone="iresnet_tiny", crop_frac=1.5))
    with pytest.raises(ConfigError, match=r"'model.region_dropout' must be in \[0, 1\)"):
        RegionAttentionNetwork(ModelConfig(backbone="iresnet_tiny", region_dropout=1.0))
    with pytest.raises(ConfigError, match=r"'model.attention_dropout' must be in \[0, 1\)"):
        RegionAttentionNetwork(ModelConfig(backbone="iresnet_tiny", attention_dropout=-0.1))
    with pytest.raises(ConfigError, match=r"'model.input_size' must be a multiple of 16.*got 50"):
        RegionAttentionNetwork(ModelConfig(backbone="iresnet_tiny", input_size=50))
    with pytest.raises(ConfigError, match=r"'model.backbone': unknown model 'resnet50'.*iresnet50"):
        RegionAttentionNetwork(ModelConfig(backbone="resnet50"))


def test_landmark_mode_without_landmarks_is_refused():
    net = tiny_ran(num_regions=5, region_mode="landmark")
    with pytest.raises(ValueError, match=r"'landmark' needs landmarks of shape \(B, 68, 2\)"):
        net(torch.randn(2, 3, 112, 112))
    net.eval()
    with pytest.raises(ValueError, match=r"'landmark' needs landmarks"):
        net(torch.randn(2, 3, 112, 112))
