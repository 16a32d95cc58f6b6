"""Pair verification: insightface's 10-fold accuracy and TAR@FAR on synthetic embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from ranray.train.verification import (
    Pair, evaluate_verification, fold_slices, kfold_accuracy, read_pairs, tar_at_far, write_pairs,
)


def _identities(num_ids: int, per_id: int, noise: float, dim: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    emb = {f"id{i}/{j}": centres[i] + noise * rng.normal(size=dim) for i in range(num_ids) for j in range(per_id)}
    pairs = [Pair(f"id{i}/0", f"id{i}/{j}", True) for i in range(num_ids) for j in range(1, per_id)]
    pairs += [Pair(f"id{i}/0", f"id{(i + k) % num_ids}/1", False)
              for i in range(num_ids) for k in range(1, per_id)]
    rng.shuffle(pairs)
    return emb, pairs


def test_separable_identities_verify_near_perfectly():
    emb, pairs = _identities(300, 5, noise=0.2)
    result = evaluate_verification(emb, pairs)
    assert result.accuracy > 0.99 and result.tar_at_far > 0.99
    assert result.num_pairs == 2400 and result.num_positive == 1200
    assert result.far_achieved <= 1e-3


def test_random_embeddings_verify_at_chance():
    emb, pairs = _identities(300, 5, noise=0.2)
    rng = np.random.default_rng(1)
    random = {k: rng.normal(size=64) for k in emb}
    result = evaluate_verification(random, pairs)
    assert 0.44 < result.accuracy < 0.56 and result.tar_at_far < 0.05


def test_folds_are_sklearn_kfold_without_shuffle():
    assert [(s.start, s.stop) for s in fold_slices(23, 10)] == [
        (0, 3), (3, 6), (6, 9), (9, 11), (11, 13), (13, 15), (15, 17), (17, 19), (19, 21), (21, 23)]


def test_threshold_is_chosen_on_the_other_nine_folds():
    # 10 folds of 10 pairs, positives at 0.5 and negatives at 2.0, except fold 0's positives at
    # 1.5. Fold 0 is tested at the threshold learnt without it (first best: 0.51), so its
    # positives fail; every other fold learns (with fold 0) the first threshold above 1.5.
    dist = np.tile(np.r_[np.full(5, 0.5), np.full(5, 2.0)], 10)
    same = np.tile(np.r_[np.ones(5, bool), np.zeros(5, bool)], 10)
    dist[:5] = 1.5
    acc, best = kfold_accuracy(dist, same, folds=10)
    assert acc[0] == 0.5 and np.all(acc[1:] == 1.0)
    assert best[0] == pytest.approx(0.51) and best[1:] == pytest.approx([1.51] * 9)


def test_tar_at_far_counts_allowed_false_accepts():
    neg = np.linspace(0.5, 4.0, 2000)  # 2000 negatives: FAR 1e-3 allows the 2 closest
    pos = np.array([0.1, 0.5, 0.5005, 0.51, 3.0])
    dist = np.r_[pos, neg]
    same = np.r_[np.ones(5, bool), np.zeros(2000, bool)]
    tar, far = tar_at_far(dist, same, 1e-3)
    assert far == pytest.approx(2 / 2000) and tar == pytest.approx(3 / 5)


def test_pairs_file_round_trip_and_errors(tmp_path):
    pairs = [Pair("a/1.jpg", "a/2.jpg", True), Pair("a/1.jpg", "b/1.jpg", False)]
    path = write_pairs(tmp_path / "pairs.txt", pairs)
    assert read_pairs(path) == pairs
    path.write_text("# header\na b 2\n")
    with pytest.raises(ValueError, match="same\\(0/1\\)"):
        read_pairs(path)
    with pytest.raises(KeyError, match="no embedding"):
        evaluate_verification({"a/1.jpg": np.ones(4)}, pairs)
