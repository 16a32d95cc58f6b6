"""The environment of a child process in which some packages cannot be imported, as where they are
not installed: a sitecustomize that refuses them is put first on its PYTHONPATH."""

from __future__ import annotations

import os
from pathlib import Path

SITECUSTOMIZE = '''
import sys

BLOCKED = {blocked!r}


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
'''


def env_without(site: Path, blocked: tuple[str, ...], *paths: str) -> dict[str, str]:
    """os.environ for a child process in which importing any of `blocked` (or their submodules) fails;
    `site` is an empty folder for the sitecustomize, `paths` go on the PYTHONPATH after it."""
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=blocked))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *paths, os.environ.get("PYTHONPATH", "")])}
