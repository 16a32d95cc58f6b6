"""Checkpoints that are written atomically and never loaded half-written.

On disk a checkpoint is two files:
    <name>            torch.save of a state dict (tensors and plain Python containers only)
    <name>.meta.json  {"sha256", "size", "step", "epoch", "file", "torch", "created"[, "summary"]}

The state file is written to a temp file in the same directory, fsynced and renamed; the
manifest is written the same way *after* it, so a manifest is the commit marker: a state file
without one, or whose size or digest differs from it, is not a checkpoint. Loading uses
`torch.load(weights_only=True)`, which refuses arbitrary pickled objects, so the state must hold
only tensors, numbers, strings, bools, None, bytes and dict / list / tuple / set of those (plus
torch.Size / dtype / device). numpy arrays and scalars are refused at save time: RNG states are
stored as tensors by `capture_rng_state()` for exactly this reason.

A Ray Train checkpoint is a directory holding STATE_FILE (state.pt) and its manifest (the trainers
add one file per rank beside it); `load_checkpoint` and `verify_checkpoint` take either the state
file or such a directory. Choosing the newest checkpoint of a run that verifies is done where Ray
hands checkpoints out (ranray.train.resume.pick_good_checkpoint), not here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

STATE_FILE = "state.pt"
MANIFEST_SUFFIX = ".meta.json"
_HASH_CHUNK = 1 << 20
_PLAIN_SCALARS = (str, int, float, bool, complex, bytes, bytearray, type(None),
                  torch.Size, torch.dtype, torch.device)
_MAPPINGS = (dict, OrderedDict, Counter)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or holds something weights_only refuses."""


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write `state` to `path` atomically, then its manifest; returns `path`.

    `state["step"]` and `state["epoch"]` (ints) are copied into the manifest when present, so the
    newest checkpoint can be found without reading every state file.
    """
    path = Path(path)
    check_weights_only(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        digest, size = _sha256(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    manifest = {
        "file": path.name, "sha256": digest, "size": size,
        "step": _int_or_none(state.get("step")), "epoch": _int_or_none(state.get("epoch")),
        "torch": torch.__version__, "created": time.time(),
    }
    if isinstance(state.get("summary"), dict):
        manifest["summary"] = state["summary"]  # small scalars a driver checks without loading the state
    atomic_write_text(manifest_path(path), json.dumps(manifest, indent=1))
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Verify `path` (a state file, or a directory holding state.pt) against its manifest and load it."""
    path = resolve_state_file(path)
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # weights_only refusals are pickle errors of several types
        raise CheckpointError(f"checkpoint {path} could not be loaded with weights_only=True: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Raise CheckpointError naming the file unless it matches its manifest; returns the manifest."""
    path = resolve_state_file(path)
    manifest = read_manifest(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is missing (its manifest exists)")
    size = path.stat().st_size
    if size != manifest["size"]:
        raise CheckpointError(
            f"checkpoint {path} is truncated or overwritten: {size} bytes, manifest says {manifest['size']}")
    digest, _ = _sha256(path)
    if digest != manifest["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: sha256 {digest} != manifest {manifest['sha256']}")
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = resolve_state_file(path)
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {path} has no manifest {mpath.name}: it was never committed")
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: manifest {mpath.name} is unreadable ({exc})") from exc
    if not isinstance(manifest, dict) or not {"sha256", "size"} <= manifest.keys():
        raise CheckpointError(f"checkpoint {path}: manifest {mpath.name} lacks sha256 / size")
    return manifest


def manifest_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + MANIFEST_SUFFIX)


def resolve_state_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / STATE_FILE if path.is_dir() else path


def check_weights_only(obj: Any, where: str = "state") -> None:
    """Refuse, naming the key path, anything that `torch.load(weights_only=True)` would refuse.

    Checked before writing so a bad state fails at the save that produced it, not at the resume
    after a crash hours later.
    """
    # Exact types, not isinstance: numpy.float64 is a float and a namedtuple a tuple, yet both
    # pickle as their own classes, which weights_only refuses.
    kind = type(obj)
    if kind in (torch.Tensor, torch.nn.Parameter) or kind in _PLAIN_SCALARS:
        return
    if kind in _MAPPINGS:
        for key, value in obj.items():
            check_weights_only(key, f"{where} key {key!r}")
            check_weights_only(value, f"{where}[{key!r}]")
        return
    if kind in (list, tuple, set):
        for i, value in enumerate(obj):
            check_weights_only(value, f"{where}[{i}]")
        return
    hint = " (convert numpy with torch.from_numpy / float())" if type(obj).__module__.startswith("numpy") else ""
    raise CheckpointError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which torch.load(weights_only=True) "
        f"refuses; a checkpoint may hold only tensors, numbers, strings, bools, None and "
        f"dict/list/tuple of those{hint}")


# ---------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (global) and torch (CPU + every CUDA device) RNG states, as tensors.

    Each DDP rank has its own streams; a loop that wants exact resumption saves one per rank.
    """
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of capture_rng_state. CUDA states are restored for the devices both runs have."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_model(state_dict: Mapping[str, torch.Tensor], config: Any,
                 path: str | os.PathLike) -> tuple[Path, Path]:
    """Write the final model: a plain CPU state_dict at `path` and its config as YAML beside it.

    DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes are stripped so the file loads
    into a bare model with `load_state_dict(torch.load(path, weights_only=True))`.
    Returns (model path, config path).
    """
    path = Path(path)
    clean = {_strip_prefixes(k): v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_checkpoint(clean, path)
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    config_path = path.with_suffix(".yaml")
    atomic_write_text(config_path, yaml.safe_dump(cfg, sort_keys=False))
    return path, config_path


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


# ---------------------------------------------------------------------------------------------
# File helpers
# ---------------------------------------------------------------------------------------------


def _temp_path(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file: temp file, fsync, os.replace."""
    tmp = _temp_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    # Makes the renames durable; some file systems (and Windows) cannot open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
