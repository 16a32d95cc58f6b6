"""A face-recognition identity folder for pretraining: ROOT/[train|val|test/]<identity>/<image>.

The label is the identity's index among the sorted identity folders of its split (so held-out
verification identities in val/ do not widen the training classifier). Keys are paths relative to
ROOT, the form a verification pairs file ("key_a key_b same") uses; ROOT/pairs.txt, when present,
is reported so that prepare can copy it beside the shards. The driver lists the folders into the
work folder (ranray.data.sources.listing); workers read that listing in runs.
"""

from __future__ import annotations

from pathlib import Path

from ranray.data.sources.common import require_dir, split_folders
from ranray.data.sources.lines import SourcePlan
from ranray.data.sources.listing import ListingParser, write_listing

PAIRS_NAME = "pairs.txt"


def plan_identity(inputs: list[str], work: Path) -> SourcePlan:
    roots = [require_dir(p, "identity folder") for p in inputs]
    identities: dict[str, list[str]] = {}
    pairs = [str(root / PAIRS_NAME) for root in roots if (root / PAIRS_NAME).is_file()]

    def folders(root: Path) -> list[tuple[str, int, Path]]:
        out = []
        for split, folder in split_folders(root).items():
            names = sorted(p.name for p in folder.iterdir() if p.is_dir())
            offset = len(identities.setdefault(split, []))
            identities[split] += names
            out += [(split, offset + i, folder / name) for i, name in enumerate(names)]
        return out

    listing = write_listing(work, ((root, folders(root)) for root in roots))
    return SourcePlan(groups=listing.groups, parser=ListingParser(tuple(map(str, roots)), False),
                      class_names=identities.get("train", []), rows=listing.rows,
                      extra={"identities": {s: len(v) for s, v in identities.items()}, "pairs_files": pairs})


def plan(cfg, work: Path) -> SourcePlan:
    return plan_identity(cfg.inputs, work)
