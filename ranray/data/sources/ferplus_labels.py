"""FERPlus labels from the 10 crowd votes, with the label modes of the FERPlus authors (Barsoum et al.
2016, the `_process_data` of github.com/microsoft/FERPlus): votes of 1 are zeroed as outliers first;
training rows use the configured mode, validation and test rows always `majority`; a row whose
processed top class is `unknown` or `NF` (non-face) is rejected with a reason. Shared by both FERPlus
layouts (ranray.data.sources.ferplus, ranray.data.sources.ferplus_folders).
"""

from __future__ import annotations

from typing import Callable

from ranray.config import CLASS_NAMES
from ranray.data.schema import NUM_VOTES
from ranray.data.sources.common import SourceRow

VOTE_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
                "unknown", "NF")
assert VOTE_COLUMNS[:len(CLASS_NAMES)] == CLASS_NAMES and len(VOTE_COLUMNS) == NUM_VOTES
UNKNOWN, NOT_FACE = 8, 9
EVAL_MODE = "majority"  # the FERPlus authors evaluate every mode against majority labels


# ---------------------------------------------------------------------------------------------
# Label modes: each takes the 10 votes after single-vote removal and returns the 10-way emotion
# vector, or None where the authors force the row to "unknown".
# ---------------------------------------------------------------------------------------------


def _majority(raw: list[float], total: float) -> list[float] | None:
    top = max(raw)
    if top > 0.5 * total:  # strictly more than half of the (kept) votes
        emotion = [0.0] * len(raw)
        emotion[raw.index(top)] = top
        return emotion
    return None


def _probability(raw: list[float], total: float) -> list[float] | None:
    """The authors' loop, kept as written: take the top classes until 75% of the votes (at most 3).

    Unknown or NF tied at the current top ends the loop; if a real emotion was taken before it,
    the unknown/NF share is dropped again.
    """
    raw = list(raw)
    emotion = [0.0] * len(raw)
    taken, count, valid = 0.0, 0, True
    while taken < 0.75 * total and count < 3 and valid:
        top = max(raw)
        for i in range(len(raw)):
            if raw[i] == top:
                emotion[i] = top
                raw[i] = 0.0
                taken += emotion[i]
                count += 1
                if i >= UNKNOWN:
                    valid = False
                    if sum(emotion) > top:
                        emotion[i] = 0.0
                        count -= 1
                    break
    if sum(emotion) <= 0.5 * total or count > 3:
        return None
    return emotion


def _multi_target(raw: list[float], total: float) -> list[float] | None:
    """Every class with at least 30% of the votes, equal to its vote share."""
    emotion = [v if v >= 0.3 * total else 0.0 for v in raw]
    return emotion if sum(emotion) > 0.5 * total else None


LABEL_MODES: dict[str, Callable[[list[float], float], list[float] | None]] = {
    "majority": _majority,
    "probability": _probability,  # the target is the same; the loss samples a label from it
    "crossentropy": _probability,  # the target is the same; the loss is soft cross-entropy
    "multi_target": _multi_target,
}
TOP_CLASS_REASONS = {UNKNOWN: "label_unknown", NOT_FACE: "label_not_face"}


def ferplus_target(votes: list[int], mode: str) -> tuple[list[float], str]:
    """(8-class target distribution, "") for a usable row, ([], reject reason) otherwise."""
    raw = [0.0 if v <= 1 else float(v) for v in votes]  # single votes are outliers
    emotion = LABEL_MODES[mode](raw, sum(raw))
    if emotion is None:
        return [], "label_no_consensus"
    top = max(range(len(emotion)), key=lambda i: (emotion[i], -i))  # first maximum, as np.argmax
    if top in TOP_CLASS_REASONS:
        return [], TOP_CLASS_REASONS[top]
    kept = emotion[:len(CLASS_NAMES)]
    total = sum(kept)
    return [v / total for v in kept], ""


def label_from_votes(row: SourceRow, label_mode: str, where: str) -> SourceRow:
    """The row's target and label from its votes (training rows in `label_mode`, the rest majority),
    or a reject naming `where`."""
    mode = label_mode if row.split == "train" else EVAL_MODE
    target, reason = ferplus_target(row.votes, mode)
    if reason:
        return reject(row, reason, f"{where}: votes {row.votes} ({mode})")
    row.target = target
    row.label = max(range(len(target)), key=lambda k: (target[k], -k))
    return row


def reject(row: SourceRow, reason: str, detail: str) -> SourceRow:
    row.reason, row.detail = reason, detail
    return row
