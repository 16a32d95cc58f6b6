"""Runs side by side: `ranray compare RUN...` puts fine-tuning runs into one table.

Each run directory names its MLflow run (RunDir.tracking_record); the figures come from MLflow:
the result split is `test` when the run has a test accuracy (the `clean` protocol's one test, or
the `ran` protocol's last epoch), else `val`. The table goes to stdout as markdown and, as
compare.md, into an MLflow run of its own (tagged with the compared run ids).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ranray.config import CLASS_NAMES, ConfigError
from ranray.data.schema import SUBSETS
from ranray.tracking import find_runs
from ranray.run_dir import RunDir

SUBSET_COLUMNS = tuple(s for s in SUBSETS if s != "all") + ("clean",)


@dataclass
class RunFigures:
    name: str
    run_id: str
    tracking_uri: str
    experiment: str
    protocol: str
    variant: str
    split: str  # the split the figures are on
    accuracy: float
    per_class: dict[str, float] = field(default_factory=dict)
    per_subset: dict[str, float] = field(default_factory=dict)


def read_run(run_dir: str | os.PathLike) -> RunFigures:
    """A run directory's figures, from the MLflow run it recorded."""
    rd = RunDir(run_dir)
    try:
        record = json.loads(rd.tracking_record.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{rd.root} is not a training run directory (no readable {rd.tracking_record.name}: "
                          f"{exc})") from exc
    runs = find_runs(record["tracking_uri"], record["experiment"], f"attributes.run_id = '{record['run_id']}'")
    if not runs:
        raise ConfigError(f"{rd.root}: MLflow run {record['run_id']} not found in {record['tracking_uri']}")
    run = runs[0]
    metrics, params, tags = run["metrics"], run["params"], run["tags"]
    split = "test" if "test_accuracy" in metrics else "val"
    if f"{split}_accuracy" not in metrics:
        raise ConfigError(f"{rd.root}: run {run['run_id']} has no accuracy yet (did it finish an epoch?)")
    return RunFigures(
        name=run["run_name"] or rd.name, run_id=run["run_id"], tracking_uri=record["tracking_uri"],
        experiment=record["experiment"], protocol=params.get("protocol", tags.get("protocol", "clean")),
        variant=params.get("model.variant", "ran"), split=split, accuracy=metrics[f"{split}_accuracy"],
        per_class={c: metrics[f"{split}_acc_{c}"] for c in CLASS_NAMES if f"{split}_acc_{c}" in metrics},
        per_subset={s: metrics[f"{split}_acc_{s}"] for s in SUBSET_COLUMNS if f"{split}_acc_{s}" in metrics})


def markdown_table(runs: Sequence[RunFigures]) -> str:
    classes = [c for c in CLASS_NAMES if any(c in r.per_class for r in runs)]
    subsets = [s for s in SUBSET_COLUMNS if any(s in r.per_subset for r in runs)]
    head = ["run", "protocol", "model", "split", "accuracy", *subsets, *classes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [r.name, r.protocol, r.variant, r.split, _pct(r.accuracy),
                 *(_pct(r.per_subset.get(s)) for s in subsets), *(_pct(r.per_class.get(c)) for c in classes)]
        lines.append("| " + " | ".join(cells) + " |")
    protocols = {r.protocol for r in runs}
    if len(protocols) > 1:
        lines.append(f"\nNote: these runs follow different protocols ({', '.join(sorted(protocols))}); "
                     "their figures are not comparable.")
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def log_comparison(runs: Sequence[RunFigures], table: str, out_dir: Path) -> str:
    """The table as an MLflow run of the first run's experiment; returns its run id."""
    from ranray.config import TrackingConfig
    from ranray.tracking import Tracker

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "compare.md"
    path.write_text(table)
    first = runs[0]
    tracking = TrackingConfig(uri=first.tracking_uri, experiment=first.experiment)
    with Tracker(tracking, out_dir) as tracker:
        run_id = tracker.start("compare", tags={"job": "compare", "compared_runs": ",".join(r.run_id for r in runs),
                                                "protocols": ",".join(sorted({r.protocol for r in runs}))})
        tracker.log_artifact(path)
        tracker.end("FINISHED")
    return run_id
