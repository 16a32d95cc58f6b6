"""What the tests read back from an MLflow store (ranray itself only writes metrics)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric, in step order."""
    history = MlflowClient(tracking_uri=tracking_uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)
