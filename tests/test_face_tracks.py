"""Face ids from frame to frame by box overlap (ranray.face_tracks), on boxes alone."""

from __future__ import annotations

import numpy as np
import pytest

from ranray.face_tracks import FaceTracker, iou_matrix


def box(x: float, y: float, size: float = 60) -> tuple[float, float, float, float]:
    return (x, y, x + size, y + size)


def test_iou_of_known_boxes():
    ious = iou_matrix([box(0, 0)], [box(0, 0), box(30, 0), box(60, 0), box(0, 0, size=30)])
    np.testing.assert_allclose(ious, [[1.0, 1800 / 5400, 0.0, 900 / 3600]])
    assert iou_matrix([], [box(0, 0)]).shape == (0, 1)


def test_a_moving_face_keeps_its_id():
    tracker = FaceTracker()
    assert [tracker.update([box(10 * i, 5 * i)]) for i in range(20)] == [[0]] * 20


def test_two_crossing_faces_keep_their_ids():
    tracker = FaceTracker()
    seen = []
    for i in range(21):  # a goes right, b goes left, 30 px lower; at i = 10 they share x
        a, b = box(10 * i, 0), box(200 - 10 * i, 30)
        order = [a, b] if i % 2 else [b, a]  # the detector's order means nothing
        ids = tracker.update(order)
        seen.append(ids if i % 2 else ids[::-1])
    assert seen == [[1, 0]] * 21 or seen == [[0, 1]] * 21
    assert seen[0] == [1, 0]  # frame 0 saw b first


def test_a_face_leaving_and_a_new_one_entering_get_new_ids():
    tracker = FaceTracker(forget_after=3)
    assert tracker.update([box(0, 0)]) == [0]
    assert tracker.update([]) == []
    assert tracker.update([]) == []
    assert tracker.update([box(2, 0)]) == [0]  # unseen for 2 processed frames: still the same face
    for _ in range(3):
        assert tracker.update([]) == []
    assert tracker.update([box(2, 0)]) == [1]  # gone for 3: a new face
    assert tracker.update([box(4, 0), box(300, 0)]) == [1, 2]  # one more enters elsewhere
    assert [t.id for t in tracker.tracks] == [1, 2]


def test_forget_after_must_be_positive():
    with pytest.raises(ValueError, match="forget_after"):
        FaceTracker(forget_after=0)
