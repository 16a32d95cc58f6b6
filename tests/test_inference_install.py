"""`pip install ranray` is the inference install (predict photos and videos, evaluate, models,
export): no Ray, DALI or MLflow among its dependencies, and those commands run in a process where
importing any of the three fails, as where they are not installed."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from blocked_imports import env_without
from PIL import Image
from skimage import data

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
TRAINING_ONLY = ("ray", "nvidia-dali", "mlflow")



def test_the_base_install_has_no_training_system_and_the_train_extra_has_it():
    names = [req.split("[")[0].split("=")[0].split(">")[0].split("<")[0] for req in PROJECT["dependencies"]]
    assert not [n for n in names if n.startswith(TRAINING_ONLY)], names
    train = " ".join(PROJECT["optional-dependencies"]["train"])
    assert all(name in train for name in TRAINING_ONLY)
    assert {"av", "onnx", "onnxruntime", "dlib-bin", "torch"} <= set(names)
    assert all("==" in req for req in PROJECT["dependencies"] if req.split("=")[0] in ("av", "onnx", "onnxruntime"))
    assert "train" in (REPO / "Makefile").read_text().split("pip install")[1].splitlines()[0]  # make installs both


@pytest.fixture(scope="module")
def without_training(tmp_path_factory) -> dict[str, str]:
    return env_without(tmp_path_factory.mktemp("site"), ("ray", "mlflow", "nvidia.dali"))


def ranray(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ranray.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_the_blocker_blocks(without_training, tmp_path):
    done = subprocess.run([sys.executable, "-c", "import mlflow"], env=without_training, capture_output=True,
                          text=True)
    assert done.returncode != 0 and "No module named 'mlflow'" in done.stderr


def test_predict_a_photo_and_a_video_list_models_and_export_without_ray_dali_or_mlflow(without_training, tmp_path):
    import av

    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 256, 256, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(data.astronaut()[:256, 96:352].copy(), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    onnx_file = tmp_path / "ran.onnx"
    commands = {"predict": ("predict", str(photo), str(clip), "--json"), "models": ("models",),
                "export": ("export", "--onnx", str(onnx_file), "--faces", str(photo))}
    with ThreadPoolExecutor(len(commands)) as pool:  # three children at once: each is mostly one core's imports
        children = {name: pool.submit(ranray, without_training, *args, cwd=tmp_path) for name, args in commands.items()}
    done, listed, exported = (children[name].result() for name in commands)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"label": "happiness"' in done.stdout
    assert "3 frames read, 3 processed, 3 faces in 1 tracks" in done.stderr
    rows = (tmp_path / "clip_faces.csv").read_text().splitlines()[1:]
    assert [row.split(",")[7] for row in rows] == ["happiness"] * 3
    assert listed.returncode == 0 and "ferplus_ran_pooled (default)" in listed.stdout, listed.stderr[-2000:]
    assert exported.returncode == 0 and onnx_file.is_file(), exported.stderr[-2000:]
    assert "1 aligned from" in exported.stdout
