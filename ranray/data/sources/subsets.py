"""Subset lists (occlusion, pose30, pose45 as in the RAN paper's FERPlus lists) -> row flags.

A list is a text file with one image name per line. An entry matches a row whose key equals it,
or whose key's file name equals it (lists often hold bare names while keys carry folders).
Entries that match no row are counted, so that a list for the wrong dataset is noticed.
"""

from __future__ import annotations

from pathlib import PurePath

from ranray.data.schema import SUBSET_FLAGS
from ranray.data.sources.common import SourceRow, require_file


def load_list(path: str) -> set[str]:
    text = require_file(path, "subset list").read_text(encoding="utf-8")
    return {line.strip() for line in text.splitlines() if line.strip()}


def mark_subsets(rows: list[SourceRow], subset_lists: dict[str, str]) -> dict[str, dict[str, int]]:
    """Set the flag bits in place; returns {subset: {"listed", "matched", "unmatched"}}."""
    report = {}
    for subset, path in subset_lists.items():
        names = load_list(path)
        bit = SUBSET_FLAGS[subset]
        matched: set[str] = set()
        for row in rows:
            hit = row.key if row.key in names else PurePath(row.key).name
            if hit in names:
                row.flags |= bit
                matched.add(hit)
        report[subset] = {"listed": len(names), "matched": len(matched), "unmatched": len(names - matched)}
    return report
