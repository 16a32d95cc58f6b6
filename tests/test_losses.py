"""Region-biased loss and FERPlus label-mode losses on hand-made values."""

from __future__ import annotations

import math

import pytest
import torch

from ranray.models import LABEL_MODES, expression_loss, region_biased_loss, share_concentration
from ranray.models.losses import rb_margin_for

P = [0.2, 0.5, 0.3]
LOGITS = torch.log(torch.tensor([P]))  # softmax(LOGITS) == P exactly enough for 1e-6


def test_rb_loss_in_sigmoid_space_zero_when_margin_met_and_linear_otherwise():
    assert region_biased_loss(torch.tensor([[0.5, 0.7, 0.2]]), margin=0.1, space="sigmoid").item() == 0.0  # gap 0.2 >= 0.1
    assert region_biased_loss(torch.tensor([[0.5, 0.6, 0.2]]), margin=0.1, space="sigmoid").item() == pytest.approx(0.0, abs=1e-7)
    assert region_biased_loss(torch.tensor([[0.5, 0.55, 0.1]]), margin=0.1, space="sigmoid").item() == pytest.approx(0.05)
    # Linear in the gap below the margin: lowering the best region by d raises the loss by d.
    for d in (0.0, 0.01, 0.1, 0.3):
        mu = torch.tensor([[0.5, 0.55 - d, 0.1]])
        assert region_biased_loss(mu, margin=0.1, space="sigmoid").item() == pytest.approx(0.05 + d, abs=1e-6)
    # Batch mean; row 3's best region is below the whole face: 0.1 - (0.4 - 0.6) = 0.3.
    mu = torch.tensor([[0.5, 0.7, 0.2], [0.5, 0.55, 0.1], [0.6, 0.3, 0.4]])
    assert region_biased_loss(mu, space="sigmoid").item() == pytest.approx((0.0 + 0.05 + 0.3) / 3, abs=1e-6)
    assert region_biased_loss(mu, margin=0.03, space="sigmoid").item() == pytest.approx((0.0 + 0.0 + 0.23) / 3, abs=1e-6)


def test_rb_loss_in_sigmoid_space_gradient_pushes_best_region_up_and_whole_face_down():
    mu = torch.tensor([[0.5, 0.55, 0.1], [0.5, 0.9, 0.1]], requires_grad=True)
    region_biased_loss(mu, margin=0.1, space="sigmoid").backward()
    # Only the active row (row 0) has gradient: +1/B on mu_0, -1/B on its best region.
    torch.testing.assert_close(mu.grad, torch.tensor([[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]]))


def test_rb_loss_is_float32_and_checks_shape():
    assert region_biased_loss(torch.tensor([[0.5, 0.55]], dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"K >= 2"):
        region_biased_loss(torch.tensor([[0.5], [0.4]]))


def test_rb_loss_default_is_the_official_softmax_space():
    mu = torch.tensor([[0.5, 0.7, 0.2], [0.9, 0.1, 0.2]])
    e = [[math.exp(v) for v in row] for row in mu.tolist()]
    w = [[v / sum(row) for v in row] for row in e]  # softmax over the K regions, whole face first
    expected = sum(max(0.0, 0.1 - (max(row[1:]) - row[0])) for row in w) / 2
    assert region_biased_loss(mu, margin=0.1).item() == pytest.approx(expected, abs=1e-6)
    assert region_biased_loss(mu, margin=0.1, space="softmax").item() == pytest.approx(expected, abs=1e-6)
    # Row 0 meets the margin between sigmoid weights (0.2 >= 0.1) but not between softmax weights (0.075).
    assert region_biased_loss(mu[:1], margin=0.1, space="sigmoid").item() == 0.0
    assert region_biased_loss(mu[:1], margin=0.1).item() == pytest.approx(0.1 - (w[0][1] - w[0][0]), abs=1e-6)
    with pytest.raises(ValueError, match=r"unknown RB-loss space 'logit'; known: softmax, sigmoid"):
        region_biased_loss(mu, space="logit")


def test_share_concentration_is_zero_for_an_even_spread_and_log_k_for_one_region():
    even = torch.full((3, 6), 0.5)
    assert share_concentration(even, torch.ones(3, 6)).item() == pytest.approx(0.0, abs=1e-6)
    one = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    assert share_concentration(torch.ones(1, 6), one).item() == pytest.approx(math.log(6), abs=1e-6)
    # Shares 0.5 / 0.25 / 0.25 from mu * nu = 0.8 * 0.5, 0.4 * 0.5, 0.2 * 1.0
    mu, nu = torch.tensor([[0.8, 0.4, 0.2]]), torch.tensor([[0.5, 0.5, 1.0]])
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert share_concentration(mu, nu).item() == pytest.approx(math.log(3) - entropy, abs=1e-6)


def test_share_concentration_gradient_lifts_the_small_shares():
    mu = torch.tensor([[0.9, 0.5, 0.1]], requires_grad=True)
    share_concentration(mu, torch.ones(1, 3)).backward()
    assert mu.grad[0, 0] > 0 > mu.grad[0, 2]  # descent lowers the largest weight and raises the smallest
    with pytest.raises(ValueError, match=r"mu and nu must both be \(B, K\)"):
        share_concentration(torch.ones(2, 3), torch.ones(2, 4))


def test_rb_margin_defaults_come_from_the_dataset():
    assert [rb_margin_for(s, None) for s in ("ferplus", "affectnet", "rafdb", "imagefolder", None)] == \
        [0.1, 0.02, 0.02, 0.1, 0.1]
    assert rb_margin_for("affectnet", 0.05) == 0.05  # an explicit loss.rb_margin wins


def test_majority_is_hard_label_cross_entropy():
    got = expression_loss(LOGITS, torch.tensor([1]), None, "majority").item()
    assert got == pytest.approx(-math.log(0.5), abs=1e-6)
    targets = torch.tensor([[0.0, 1.0, 0.0]])
    assert expression_loss(LOGITS, torch.tensor([2]), targets, "majority").item() == pytest.approx(-math.log(0.3),
                                                                                                   abs=1e-6)


def test_crossentropy_uses_the_vote_distribution():
    votes = torch.tensor([[0.0, 6.0, 2.0]])  # counts are renormalised: 0.75 / 0.25
    want = -(0.75 * math.log(0.5) + 0.25 * math.log(0.3))
    assert expression_loss(LOGITS, torch.tensor([1]), votes, "crossentropy").item() == pytest.approx(want, abs=1e-6)
    dist = torch.tensor([[0.0, 0.75, 0.25]])
    assert expression_loss(LOGITS, torch.tensor([1]), dist, "crossentropy").item() == pytest.approx(want, abs=1e-6)


def test_multi_target_takes_the_most_likely_accepted_class():
    t = torch.tensor([[0.0, 0.6, 0.4], [0.6, 0.0, 0.4]])
    logits = LOGITS.expand(2, 3)
    want = (-math.log(0.5) - math.log(0.3)) / 2  # row 0: max(p1, p2) = 0.5; row 1: max(p0, p2) = 0.3
    assert expression_loss(logits, torch.tensor([1, 0]), t, "multi_target").item() == pytest.approx(want, abs=1e-6)


def test_probability_draws_labels_whose_average_is_the_soft_loss():
    one_hot = torch.tensor([[0.0, 0.0, 1.0]])
    assert expression_loss(LOGITS, torch.tensor([2]), one_hot, "probability").item() == pytest.approx(
        -math.log(0.3), abs=1e-6)
    torch.manual_seed(0)
    n = 20000
    t = torch.tensor([[0.0, 0.75, 0.25]]).expand(n, 3)
    got = expression_loss(LOGITS.expand(n, 3), torch.ones(n, dtype=torch.long), t, "probability").item()
    want = -(0.75 * math.log(0.5) + 0.25 * math.log(0.3))  # E[CE(drawn)] = soft CE
    assert got == pytest.approx(want, abs=0.01)  # std of the mean here is ~0.002


def test_rows_without_votes_fall_back_to_the_hard_label():
    zeros = torch.zeros(1, 3)
    for mode in LABEL_MODES:
        got = expression_loss(LOGITS, torch.tensor([1]), zeros, mode).item()
        assert got == pytest.approx(-math.log(0.5), abs=1e-6), mode


def test_losses_are_float32_and_differentiable_under_low_precision_logits():
    logits = LOGITS.to(torch.bfloat16).requires_grad_()
    t = torch.tensor([[0.0, 0.75, 0.25]])
    for mode in LABEL_MODES:
        loss = expression_loss(logits, torch.tensor([1]), t, mode)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(g.float()).all() and g.float().abs().sum() > 0


def test_unknown_mode_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"unknown label mode 'soft'; known: majority, probability, crossentropy, "
                                         r"multi_target"):
        expression_loss(LOGITS, torch.tensor([1]), None, "soft")
    with pytest.raises(ValueError, match=r"'crossentropy' needs targets"):
        expression_loss(LOGITS, torch.tensor([1]), None, "crossentropy")
    with pytest.raises(ValueError, match=r"targets must match logits \(1, 3\)"):
        expression_loss(LOGITS, torch.tensor([1]), torch.ones(1, 4), "crossentropy")
