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


def mark_row(row: SourceRow, subsets: dict[str, set[str]], matched: dict[str, set[str]]) -> None:
    """Set the row's flag bits for every subset whose names list it; note the names that matched."""
    for subset, names in subsets.items():
        hit = row.key if row.key in names else PurePath(row.key).name
        if hit in names:
            row.flags |= SUBSET_FLAGS[subset]
            matched.setdefault(subset, set()).add(hit)


def mark_subsets(rows: list[SourceRow], subset_lists: dict[str, str]) -> dict[str, dict[str, int]]:
    """Set the flag bits in place; returns {subset: {"listed", "matched", "unmatched"}}."""
    subsets = {subset: load_list(path) for subset, path in subset_lists.items()}
    matched: dict[str, set[str]] = {s: set() for s in subsets}
    for row in rows:
        mark_row(row, subsets, matched)
    return {s: {"listed": len(names), "matched": len(matched[s]), "unmatched": len(names - matched[s])}
            for s, names in subsets.items()}
