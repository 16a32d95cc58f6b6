"""Shared fixtures: one local Ray instance for the whole session (start-up costs seconds), one
learnable dataset for the session, a run storage per module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep torch from oversubscribing the 2 cores when Ray runs several workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls workers (and so registers reported checkpoints) at this interval;
# every checkpoint waits for its registration (ranray.train.commits), so tests poll faster than 2 s.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
# Every Ray Train run starts a preemption-watcher actor (one more process on 2 cores) that polls
# Ray's node-drain notices; no test drains a node (the cluster tests kill nodes, which it does not see).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Every Ray process the tests start (session workers, `ranray` subprocesses, cluster nodes and their
# jobs) inherits this environment: they import the tests' engine hooks (step_hooks, run.hooks).
_TESTS = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray, shared by every test that needs one.

    4 logical CPUs on the 2 cores: a 2-worker TorchTrainer plus its driver and a Ray Data
    actor pool must fit at once. The dashboard stays on: Ray Train's placement-group cleanup
    and `ray job submit` need it.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True, log_to_driver=True,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The learnable fixture set (train_fixtures.learnable_dataset), written once a session and only
    read: every module that trains on it shares it. A test that changes a dataset makes its own."""
    from train_fixtures import learnable_dataset

    return learnable_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """The module's own run storage: run names are unique within a module, never across modules."""
    return tmp_path_factory.mktemp("runs")
