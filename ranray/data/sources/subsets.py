"""Subset lists (occlusion, pose30, pose45: the RAN paper's test subsets) -> row flags.

RAN's published lists come in several formats; each line names one image, and only its first
token does (the rest are labels):

    0/fer0000001 6              FERPlus train/test lists: class folder / name, label
    1_fer0034656.png 8 0        FERPlus occlusion list: "<class>_" + file name, labels
    0/fer0032226.jpg            FERPlus pose lists: class folder / file name
    test_0003_aligned 3 4       RAF-DB lists: the aligned image's stem, labels
    fer0034656.png              a plain file name

An entry and a row key are compared by their canonical name: the file name without folders,
image extension, the occlusion list's "<digits>_" prefix before a FERPlus name and RAF-DB's
"_aligned" suffix. A line in none of these forms is an error naming file and line; an entry that
matches no row is reported (count and examples in the manifest, and a warning), never ignored.
"""

from __future__ import annotations

import logging
import re
from pathlib import PurePath

from ranray.data.schema import SUBSET_FLAGS
from ranray.data.sources.common import IMAGE_EXTENSIONS, SourceError, SourceRow, require_file

log = logging.getLogger(__name__)

_CLASS_PREFIX = re.compile(r"^\d+_(?=fer\d)")  # the FERPlus occlusion list's "<class>_"
_NAME = re.compile(r"^[\w.\-]+$")
UNMATCHED_EXAMPLES = 5


def canonical(name: str) -> str:
    base = PurePath(name).name
    stem, dot, ext = base.rpartition(".")
    if dot and f".{ext.lower()}" in IMAGE_EXTENSIONS:
        base = stem
    return _CLASS_PREFIX.sub("", base).removesuffix("_aligned")


def load_list(path: str) -> set[str]:
    """The canonical names a list file holds."""
    file = require_file(path, "subset list")
    names = set()
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        name = canonical(tokens[0])
        if len(tokens) > 3 or not all(t.lstrip("-").isdigit() for t in tokens[1:]) or not _NAME.match(name):
            raise SourceError(f"subset list {file} line {number}: {line.strip()!r} is in none of the known formats "
                              "('NAME', 'FOLDER/NAME LABEL', 'NAME LABEL LABEL')")
        names.add(name)
    return names


def mark_row(row: SourceRow, subsets: dict[str, set[str]], matched: dict[str, set[str]]) -> None:
    """Set the row's flag bits for every subset that lists it; note the names that matched."""
    name = canonical(row.key)
    for subset, names in subsets.items():
        if name in names:
            row.flags |= SUBSET_FLAGS[subset]
            matched.setdefault(subset, set()).add(name)


def subset_report(listed: dict[str, set[str]], matched: dict[str, set[str]]) -> dict[str, dict]:
    """{subset: listed, matched, unmatched, unmatched_examples}; a warning for every list with misses."""
    report = {}
    for subset, names in listed.items():
        missing = sorted(names - matched.get(subset, set()))
        report[subset] = {"listed": len(names), "matched": len(names) - len(missing), "unmatched": len(missing),
                          "unmatched_examples": missing[:UNMATCHED_EXAMPLES]}
        if missing:
            log.warning("subset list %s: %d of %d names match no row, e.g. %s", subset, len(missing), len(names),
                        ", ".join(missing[:UNMATCHED_EXAMPLES]))
    return report


def mark_subsets(rows: list[SourceRow], subset_lists: dict[str, str]) -> dict[str, dict]:
    """Set the flag bits in place; returns subset_report."""
    subsets = {subset: load_list(path) for subset, path in subset_lists.items()}
    matched: dict[str, set[str]] = {s: set() for s in subsets}
    for row in rows:
        mark_row(row, subsets, matched)
    return subset_report(subsets, matched)
