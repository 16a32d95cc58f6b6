"""Transitional alias: RunDir lives in ranray.run_dir (data/, tracking and train/ all import it downward).

Kept only for ranray/train/evaluate.py, which another branch is moving; delete this file once that
import reads `from ranray.run_dir import RunDir`.
"""

from ranray.run_dir import RunDir

__all__ = ["RunDir"]
