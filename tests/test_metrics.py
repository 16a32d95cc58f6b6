"""Metrics on hand-made predictions, the DDP all-reduce (2 gloo processes), and the plots."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ranray.config import CLASS_NAMES
from ranray.data.schema import FLAG_OCCLUSION, FLAG_POSE30, FLAG_POSE45
from ranray.train.metrics import (EvalAccumulator, accuracy, confusion_matrix, per_class_accuracy,
                                  subset_accuracy)

# 10 rows, 3 classes; 6 correct. Row 9 has no label (-1) and is ignored everywhere.
PREDS = [0, 0, 1, 1, 2, 2, 0, 1, 2, 1]
LABELS = [0, 0, 1, 2, 2, 2, 1, 1, 0, -1]
FLAGS = [0, FLAG_OCCLUSION, FLAG_OCCLUSION, FLAG_OCCLUSION | FLAG_POSE30, FLAG_POSE30, 0, 0,
         FLAG_POSE30, 0, FLAG_OCCLUSION]
CM = [[2, 0, 1],
      [1, 2, 0],
      [0, 1, 2]]


def test_accuracy_and_confusion_matrix_on_known_values() -> None:
    assert accuracy(PREDS, LABELS) == pytest.approx(6 / 9)
    assert accuracy(torch.tensor(PREDS), torch.tensor(LABELS)) == pytest.approx(6 / 9)
    np.testing.assert_array_equal(confusion_matrix(PREDS, LABELS, 3), CM)
    np.testing.assert_allclose(per_class_accuracy(np.array(PREDS), np.array(LABELS), 3), [2 / 3] * 3)
    assert math.isnan(accuracy([], []))


def test_per_class_accuracy_is_nan_for_an_absent_class() -> None:
    got = per_class_accuracy([0, 1, 1, 0], [0, 1, 1, 1], num_classes=3)
    np.testing.assert_allclose(got[:2], [1.0, 2 / 3])
    assert math.isnan(got[2])


def test_subset_accuracy_by_flag_bit() -> None:
    # occlusion: rows 1, 2, 3 (row 9 is unlabelled) -> correct 1, 2 -> 2/3
    assert subset_accuracy(PREDS, LABELS, FLAGS, FLAG_OCCLUSION) == pytest.approx(2 / 3)
    # pose30: rows 3, 4, 7 -> correct 4, 7 -> 2/3
    assert subset_accuracy(PREDS, LABELS, FLAGS, FLAG_POSE30) == pytest.approx(2 / 3)
    assert math.isnan(subset_accuracy(PREDS, LABELS, FLAGS, FLAG_POSE45))


def test_confusion_matrix_refuses_out_of_range_classes() -> None:
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix([3], [0], 3)


def _accumulate(acc: EvalAccumulator, rows: range) -> None:
    logits = torch.nn.functional.one_hot(torch.tensor(PREDS), 3).to(torch.bfloat16) * 5.0  # as under autocast
    for start in range(rows.start, rows.stop, 2):
        idx = list(range(start, min(start + 2, rows.stop)))
        acc.update(logits[idx], torch.tensor(LABELS)[idx], torch.tensor(FLAGS)[idx],
                   loss=torch.tensor(0.5 + 0.1 * start))


def test_accumulator_metrics_names_and_values() -> None:
    acc = EvalAccumulator(3, class_names=CLASS_NAMES[:3])
    _accumulate(acc, range(10))
    result = acc.compute()
    m = result.metrics
    assert m["val_accuracy"] == pytest.approx(6 / 9)
    assert m["val_samples"] == 9
    assert m["val_acc_neutral"] == m["val_acc_happiness"] == m["val_acc_surprise"] == pytest.approx(2 / 3)
    assert m["val_acc_occlusion"] == pytest.approx(2 / 3) and m["val_acc_pose30"] == pytest.approx(2 / 3)
    assert "val_acc_pose45" not in m  # the flag never occurs
    # batch means 0.5, 0.7, 0.9, 1.1, 1.3 weighted by labelled rows 2, 2, 2, 2, 1
    assert m["val_loss"] == pytest.approx((0.5 * 2 + 0.7 * 2 + 0.9 * 2 + 1.1 * 2 + 1.3) / 9)
    np.testing.assert_array_equal(result.confusion, CM)
    assert json.loads(json.dumps(result.to_json()))["confusion"] == CM
    acc.reset()
    assert acc.compute().metrics["val_samples"] == 0


def _rank_main(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        acc = EvalAccumulator(3, class_names=CLASS_NAMES[:3])
        _accumulate(acc, range(0, 4) if rank == 0 else range(4, 10))  # unequal shards on purpose
        result = acc.compute()
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(result.to_json()))
    finally:
        dist.destroy_process_group()


def test_two_rank_all_reduce_equals_one_process(tmp_path: Path) -> None:
    single = EvalAccumulator(3, class_names=CLASS_NAMES[:3])
    _accumulate(single, range(10))
    expected = single.compute().to_json()
    mp.spawn(_rank_main, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["confusion"] == expected["confusion"]
        assert got["metrics"].keys() == expected["metrics"].keys()
        for key, value in expected["metrics"].items():
            assert got["metrics"][key] == pytest.approx(value), key


# Plot imports stay inside the plot tests: the spawned ranks import this module, and matplotlib
# would add seconds to each start-up.
def test_confusion_png_has_the_expected_size(tmp_path: Path) -> None:
    from PIL import Image

    from ranray.train.plots import confusion_figure_size, plot_confusion_matrix

    cm = np.arange(64).reshape(8, 8)
    path = plot_confusion_matrix(torch.tensor(cm), CLASS_NAMES, tmp_path / "cm.png", title="val")
    w, h = confusion_figure_size(8)
    img = Image.open(path)
    assert img.size == (round(w * 100), round(h * 100))
    assert len(np.unique(np.asarray(img.convert("L")))) > 20  # drawn, not blank


def test_attention_columns_clean_and_occluded_and_none_for_an_empty_group(tmp_path: Path) -> None:
    from PIL import Image

    from ranray.data.schema import FLAG_OCCLUSION
    from ranray.train.plots import attention_columns, attention_figure_size, plot_attention_faces

    occ = FLAG_OCCLUSION
    assert attention_columns(3) == [(None, [0, 1, 2])]
    assert attention_columns(4, [0, occ, 0, occ | 2]) == [("clean faces", [0, 2]), ("occluded faces", [1, 3])]
    assert attention_columns(2, [occ, occ]) == [("occluded faces", [0, 1])]  # no empty clean column
    assert attention_columns(2, [0, 2]) == [("clean faces", [0, 1])]
    both, alone = attention_figure_size(4, 6, [0, occ, 0, occ]), attention_figure_size(2, 6, [occ, occ])
    assert alone[1] == both[1] and alone[0] < both[0] / 2  # one card wide, as tall as two rows
    n, k = 2, 3
    gen = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0, 0, 112, 112], [0, 0, 56, 56], [56, 56, 112, 112]], dtype=torch.float32).expand(n, k, 4)
    path = plot_attention_faces(torch.rand(n, 3, 112, 112, generator=gen) * 2 - 1, boxes, torch.rand(n, k, generator=gen),
                                torch.rand(n, k, generator=gen), [0, 1], [0, 1], tmp_path / "occ.png", flags=[occ, occ])
    w, h = attention_figure_size(n, k, [occ, occ])
    assert Image.open(path).size == (round(w * 100), round(h * 100))


def test_attention_png_has_the_expected_size(tmp_path: Path) -> None:
    from PIL import Image

    from ranray.train.plots import attention_figure_size, plot_attention_faces

    n, k = 5, 6
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 112, 112, generator=gen) * 2 - 1
    boxes = torch.tensor([[0, 0, 112, 112]] + [[i * 10, i * 10, i * 10 + 60, i * 10 + 60] for i in range(k - 1)],
                         dtype=torch.float32).expand(n, k, 4)
    mu, nu = torch.rand(n, k, generator=gen), torch.rand(n, k, generator=gen)
    path = plot_attention_faces(images, boxes, mu, nu, [0, 1, 2, 3, 4], [0, 1, 2, 3, 5],
                                tmp_path / "att.png", class_names=CLASS_NAMES)
    w, h = attention_figure_size(n)
    assert Image.open(path).size == (round(w * 100), round(h * 100))
    with pytest.raises(ValueError, match="shapes disagree"):
        plot_attention_faces(images, boxes, mu[:, :3], nu, [0] * 5, [0] * 5, tmp_path / "bad.png")
