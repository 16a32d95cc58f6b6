"""A face-recognition identity folder for pretraining: ROOT/[train|val|test/]<identity>/<image>.

The label is the identity's index among the sorted identity folders of its split (so held-out
verification identities in val/ do not widen the training classifier). Keys are paths relative to
ROOT, the form a verification pairs file ("key_a key_b same") uses; ROOT/pairs.txt, when present,
is reported so that prepare can copy it beside the shards.
"""

from __future__ import annotations

from ranray.data.sources.common import SourceRead, SourceRow, image_files, require_dir, split_folders

PAIRS_NAME = "pairs.txt"


def read_identity(inputs: list[str]) -> SourceRead:
    rows: list[SourceRow] = []
    identities: dict[str, list[str]] = {}
    pairs = []
    for root in (require_dir(p, "identity folder") for p in inputs):
        if (root / PAIRS_NAME).is_file():
            pairs.append(str(root / PAIRS_NAME))
        for split, folder in split_folders(root).items():
            names = sorted(p.name for p in folder.iterdir() if p.is_dir())
            offset = len(identities.setdefault(split, []))
            identities[split] += names
            for index, name in enumerate(names):
                rows += [SourceRow(key=str(path.relative_to(root)), split=split, label=offset + index,
                                   path=str(path)) for path in image_files(folder / name)]
    return SourceRead(rows=rows, class_names=identities.get("train", []),
                      extra={"identities": {s: len(v) for s, v in identities.items()}, "pairs_files": pairs})


def read(cfg) -> SourceRead:
    return read_identity(cfg.inputs)
