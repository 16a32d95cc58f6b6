"""Which face is which from frame to frame of a video: ids kept by box overlap (IoU).

Each processed frame's boxes are matched greedily, best overlap first, to the tracks still alive;
a box that overlaps no free track by `min_iou` starts a new track (ids count up from 0), and a
track unmatched for `forget_after` processed frames in a row ends, so a face that comes back
after longer than that gets a new id. Pure numpy: the video reader feeds it boxes, nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Box = tuple[float, float, float, float]  # left, top, right, bottom


def iou_matrix(a: Sequence[Box], b: Sequence[Box]) -> np.ndarray:
    """(len(a), len(b)) intersection over union of every pair of boxes."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    pa, pb = np.asarray(a, dtype=float)[:, None, :], np.asarray(b, dtype=float)[None, :, :]
    w = np.clip(np.minimum(pa[..., 2], pb[..., 2]) - np.maximum(pa[..., 0], pb[..., 0]), 0, None)
    h = np.clip(np.minimum(pa[..., 3], pb[..., 3]) - np.maximum(pa[..., 1], pb[..., 1]), 0, None)
    inter = w * h
    area = lambda p: (p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1])  # noqa: E731
    return inter / np.maximum(area(pa) + area(pb) - inter, 1e-9)


@dataclass
class Track:
    id: int
    box: Box
    unseen: int = 0  # processed frames in a row without a match


class FaceTracker:
    def __init__(self, min_iou: float = 0.3, forget_after: int = 5):
        if forget_after < 1:
            raise ValueError(f"forget_after must be at least 1 processed frame, got {forget_after}")
        self.min_iou = min_iou
        self.forget_after = forget_after
        self.tracks: list[Track] = []
        self.next_id = 0

    def update(self, boxes: Sequence[Box]) -> list[int]:
        """The track id of each of this frame's boxes, in their order."""
        ious = iou_matrix([t.box for t in self.tracks], boxes)
        ids: list[int | None] = [None] * len(boxes)
        matched: set[int] = set()
        # Greedy, best pair first: two crossing faces keep their ids while each overlaps its own
        # previous box more than the other's.
        for ti, bi in zip(*np.unravel_index(np.argsort(-ious, axis=None), ious.shape)):
            if ious[ti, bi] < self.min_iou:
                break
            if ti in matched or ids[bi] is not None:
                continue
            track = self.tracks[ti]
            track.box, track.unseen, ids[bi] = tuple(boxes[bi]), 0, track.id
            matched.add(ti)
        for ti, track in enumerate(self.tracks):
            if ti not in matched:
                track.unseen += 1
        self.tracks = [t for t in self.tracks if t.unseen < self.forget_after]
        for bi, box in enumerate(boxes):
            if ids[bi] is None:
                self.tracks.append(Track(self.next_id, tuple(box)))
                ids[bi] = self.next_id
                self.next_id += 1
        return [int(i) for i in ids]
