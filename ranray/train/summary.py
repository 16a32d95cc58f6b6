"""The summary table `ranray train` and `ranray pretrain` print at the end of a run: the rows every
run has (name, steps, loss, speed, time, files, MLflow) around each job kind's own rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def summary_rows(result: Any, head: list[tuple[str, str]],
                 scores: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The summary table every job kind prints: its own `head` rows after the run's name, its
    `scores` after the steps, then what every run has (loss, speed, time, files, MLflow)."""
    m = result.metrics
    return [("run", result.run_name + (" (resumed)" if result.resumed else "")), *head,
            ("epochs / steps", f"{m.get('epoch', '?')} / {m.get('step', '?')}"), *scores,
            ("train loss", f"{m.get('train_loss', float('nan')):.4f}"),
            ("throughput", f"{m.get('images_per_s', float('nan')):.1f} images/s"),
            ("time", f"{result.elapsed_s:.0f} s"), ("run dir", str(result.run_dir)),
            *[(key.replace("_", " "), str(path)) for key, path in result.artifacts.items()],
            ("MLflow run", f"{result.mlflow_run_id} in {result.tracking_uri}"), ("MLflow UI", result.ui_command)]


def format_table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
