"""A test module's independent Ray runs started together, each driven from a thread of this process.

On 2 cores a Ray Train run leaves a core idle for seconds (its controller and worker processes
starting up one after the other, its teardown); a second run's steps fill those gaps. Two tiny
2-worker runs took 33 s together against 44 s one after the other. The runs cannot see each other:
each has its own run directory and MLflow store, and its workers seed themselves.

`run_together` returns only when every job has ended, so nothing trains in the background while
the module's other tests run: a driver's preflight builds a model from torch's global RNG, which
a local run in the main thread draws from too. What a job returned or raised comes back as its
Future, so a failed run fails the tests that read it, with its own traceback.

The session's Ray has 4 logical CPUs (conftest.ray_session): the jobs running at once must not ask
for more, or a run's workers wait for another run's.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def run_together(jobs: dict[str, Callable[[], T]], at_once: int = 2,
                 after: dict[str, str] | None = None) -> dict[str, Future[T]]:
    """Run `jobs`, `at_once` at a time in the order given, and wait for all of them.

    after: job -> an earlier job it needs: it starts once that one has succeeded (else it raises
        that one's error).
    """
    from ranray.ray_runtime import ensure_ray

    ensure_ray()  # joined once, here: the driver's output filter is installed by one thread
    futures: dict[str, Future[T]] = {}
    with ThreadPoolExecutor(at_once, thread_name_prefix="ray-run") as pool:
        for name, job in jobs.items():
            needed = futures[after[name]] if after and name in after else None
            futures[name] = pool.submit(_once_done, needed, job)
    return futures


def _once_done(needed: Future | None, job: Callable[[], T]) -> T:
    if needed is not None:
        needed.result()
    return job()
