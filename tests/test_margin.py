"""Combined margin softmax: values against hand computation, safeguards, half precision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from margin_presets import margin_preset

from ranray.config import MarginConfig
from ranray.models.margin import COS_EPS, CombinedMarginLoss, margin_target_cos


def test_arcface_target_logit_matches_hand_computation():
    head = CombinedMarginLoss.from_config(margin_preset("arcface"))
    cos = torch.tensor([[0.5, 0.2, -0.1]])
    logits = head(cos, torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(64 * math.cos(math.acos(0.5) + 0.5), rel=1e-5)
    assert logits[0, 1:].tolist() == pytest.approx([64 * 0.2, 64 * -0.1], rel=1e-6)


def test_cosface_subtracts_m3():
    head = CombinedMarginLoss.from_config(margin_preset("cosface"))
    logits = head(torch.tensor([[0.1, 0.5]]), torch.tensor([1]))
    assert logits[0].tolist() == pytest.approx([6.4, 64 * (0.5 - 0.4)], rel=1e-5)


def test_combined_m1_m2_m3():
    cfg = MarginConfig(scale=30.0, m1=0.9, m2=0.4, m3=0.15)
    got = CombinedMarginLoss.from_config(cfg).target_logit(torch.tensor([0.3]))
    assert got.item() == pytest.approx(30 * (math.cos(0.9 * math.acos(0.3) + 0.4) - 0.15), rel=1e-5)


def test_fallback_past_pi_uses_insightface_th_mm():
    # theta = acos(-0.95) = 2.82 > pi - 0.5: cos(theta) - m2 * sin(m2) instead of cos(theta + m2).
    got = margin_target_cos(torch.tensor([-0.95]), margin_preset("arcface"))
    assert got.item() == pytest.approx(-0.95 - 0.5 * math.sin(0.5), rel=1e-6)


def test_arcface_target_logit_never_rises_with_theta():
    cos = torch.cos(torch.linspace(0.0, math.pi, 2001))
    values = margin_target_cos(cos, margin_preset("arcface"))
    assert bool((values[1:] <= values[:-1] + 1e-6).all())


def test_easy_margin_leaves_obtuse_targets_alone():
    cfg = margin_preset("arcface", easy_margin=True)
    got = margin_target_cos(torch.tensor([-0.3, 0.3]), cfg)
    assert got.tolist() == pytest.approx([-0.3, math.cos(math.acos(0.3) + 0.5)], rel=1e-5)


def test_ignored_rows_and_loss_equal_plain_cross_entropy():
    head = CombinedMarginLoss(scale=10.0, m2=0.3)
    cos = torch.tensor([[0.4, 0.1], [0.2, 0.3]])
    labels = torch.tensor([0, -1])
    logits = head(cos, labels)
    assert logits[1].tolist() == pytest.approx([2.0, 3.0])  # label -1: no margin
    expected = F.cross_entropy(logits[:1], labels[:1])
    assert head.loss(cos, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_preset_unknown_name_lists_known():
    with pytest.raises(ValueError, match="arcface"):
        margin_preset("sphereface2")


@pytest.mark.parametrize("preset", ["arcface", "cosface"])
def test_no_nan_under_bf16_autocast_at_cos_plus_minus_one(preset):
    head = CombinedMarginLoss.from_config(margin_preset(preset))
    cos = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.9999], [0.99999, 0.5, -0.99999]],
                       dtype=torch.bfloat16, requires_grad=True)
    labels = torch.tensor([0, 0, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(cos, labels)
        loss = F.cross_entropy(logits, labels)
    assert logits.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(cos.grad.float()).all())


def test_acos_gradient_is_bounded_at_the_clamp():
    cos = torch.tensor([1.0, -1.0, 1.0 - COS_EPS / 2], requires_grad=True)
    margin_target_cos(cos, margin_preset("arcface")).sum().backward()
    assert bool(torch.isfinite(cos.grad).all())
