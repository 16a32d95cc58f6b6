"""The one way ranray joins or starts Ray: `ensure_ray()`, used by every command.

- RAY_ADDRESS set (a cluster; `ray job submit` sets it): connect, and leave the cluster's settings
  alone.
- Otherwise start a local Ray with the dashboard: Ray Train's placement-group cleaner (which frees
  the workers of a trial ASHA stopped, or of a failed group) asks the state API it serves, and
  `ray job submit` needs it. Workers get OMP_NUM_THREADS=1: each sets its own torch threads, and
  OpenMP's default of one thread per core oversubscribes a small machine.

Either way the driver's stream of worker output loses Ray Train's failure dumps
(ranray.failures.quiet_controller_dumps): a failed run ends in one line instead.
"""

from __future__ import annotations

import os

from ranray.failures import quiet_controller_dumps


def ensure_ray(num_cpus: int | None = None) -> None:
    """Use the Ray this process is connected to, else RAY_ADDRESS's cluster, else a local one."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=True,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    quiet_controller_dumps()
