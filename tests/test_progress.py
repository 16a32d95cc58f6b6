"""Progress: the training bar (rank 0's Hook, drawn by the driver through Ray's log stream), the
training's plain lines in a redirected log (`ranray train --local`: the lines are the loop's, the
same under Ray), the driver's terminal check, and offline evaluation's bar on a terminal (a real pty)."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from train_fixtures import tiny_config

from ranray.config import ConfigError, TrainConfig, flatten, load_config
from ranray.train.launch import run_training
from ranray.train.progress import resolve_progress

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"progress: step (\d+) epoch (\d+\.\d\d)/1 loss (\S+) (\d+\.\d) faces/s ETA (\d+):(\d\d):(\d\d)$",
                  re.MULTILINE)


def terminal_pair() -> tuple[int, int]:
    """A real pty sized like a terminal window (a fresh pty is 0 columns wide: tqdm draws nothing)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    return master, slave


def read_pty(fd: int) -> str:
    chunks = []
    while select.select([fd], [], [], 0.5)[0]:
        try:
            chunks.append(os.read(fd, 65536))
        except OSError:
            break
    return b"".join(chunks).decode(errors="replace")


def test_auto_means_a_bar_on_a_terminal_and_lines_elsewhere(tmp_path):
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as terminal, open(tmp_path / "log.txt", "w") as file:
        assert resolve_progress("auto", terminal) == "bar"
        assert resolve_progress("auto", file) == "lines"  # e.g. `ray job submit`, or `> train.log`
        assert resolve_progress("on", file) == "bar"  # the old name, in existing job files
        assert resolve_progress("off", terminal) == "off" and resolve_progress("lines", terminal) == "lines"
        assert resolve_progress(False, terminal) == "off" and resolve_progress(True, file) == "bar"  # YAML's off, on
    os.close(master)
    with pytest.raises(ValueError, match="run.progress"):
        resolve_progress("sometimes")
    with pytest.raises(ConfigError, match="'run.progress_every_s' must be > 0"):
        load_config(TrainConfig, None, ["run.progress_every_s=0"])


@pytest.fixture(scope="module")
def lines_run(data_dir, tmp_path_factory) -> Iterator[Future]:
    """`ranray train --local > train.log` in a child process, started by the Ray run's test before
    it so that the two train side by side, on both cores (a child of its own: nothing it does
    reaches this process's output or RNG): (exit, stderr, wall seconds, the log's text)."""
    tmp = tmp_path_factory.mktemp("lines")
    cfg = tiny_config(data_dir, tmp, "lines", "epochs=1", "checkpoint.every_n_steps=0",
                      "run.progress_every_s=0.01", "scaling.num_workers=1")
    args = [f"{k}={'null' if v is None else v}" for k, v in flatten(cfg).items() if not isinstance(v, (list, dict))]

    def train() -> tuple[int, str, float, str]:
        started = time.perf_counter()
        with open(tmp / "train.log", "w") as log:
            done = subprocess.run([sys.executable, "-m", "ranray.cli", "train", "--local", *args], stdout=log,
                                  stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=300)
        return done.returncode, done.stderr, time.perf_counter() - started, (tmp / "train.log").read_text()

    with ThreadPoolExecutor(1, thread_name_prefix="lines") as pool:
        yield pool.submit(train)


def test_training_bar_shows_epoch_loss_throughput_and_eta_on_the_driver(ray_session, data_dir, tmp_path, capfd,
                                                                         lines_run):
    # run.progress=off silences the built-in lines (which a line every step would show), not a bar
    # that run.hooks asks for.
    cfg = tiny_config(data_dir, tmp_path, "bar", "epochs=2", "run.progress=off", "run.progress_every_s=0.01",
                      hooks=("ranray.train.progress:forced",))
    result = run_training(cfg)
    assert result.metrics["step"] == 12
    out, err = capfd.readouterr()
    assert "epoch 2 step 12: train_loss" in out  # rank 0's stdout did reach the driver
    assert "progress: step" not in out + err
    # tqdm's last frame of each epoch's bar: description, 6/6 steps, elapsed<remaining, rate.
    # (tqdm_ray's driver side scales units: 6.00/6.00)
    finals = re.findall(r"epoch (\d)/2 loss (\d+\.\d+) (\d+) img/s: 100%\|[^|]*\| 6(?:\.00)?/6(?:\.00)? "
                        r"\[\d\d:\d\d<00:00, \d+\.\d+(?:step/s|s/step)\]", err)
    assert sorted(set(e for e, _, _ in finals)) == ["1", "2"], err[-3000:]
    assert all(float(loss) > 0 and int(rate) > 0 for _, loss, rate in finals)


def test_training_output_to_a_file_shows_progress_lines(lines_run):
    """`ranray train --local > train.log`: no terminal, so plain lines (one per loss read here: every step)."""
    returncode, stderr, wall, text = lines_run.result()
    assert returncode == 0, text[-2000:] + stderr[-3000:]
    lines = [(int(s), float(ep), float(loss), float(rate), int(h) * 3600 + int(m) * 60 + int(sec))
             for s, ep, loss, rate, h, m, sec in LINE.findall(text)]
    steps = [line[0] for line in lines]
    assert len(lines) >= 4 and steps == sorted(set(steps)) and set(steps) <= set(range(1, 13)), text[-3000:]
    for step, epochs, loss, rate, eta in lines:
        assert epochs == round(step / 12, 2)  # 1 worker of batch 8 over 96 faces: 12 steps an epoch
        assert 0 < loss < 10 and 8 / wall <= rate  # at least one step of the worker per line
        assert eta <= (12 - step) * wall / step + 1  # the pace since the start, over the steps left
    assert all(eta == 0 for step, *_, eta in lines if step == 12)


def test_evaluation_bar_on_a_terminal_and_none_on_a_pipe(data_dir, tmp_path):
    from ranray.models import build_ran
    from ranray.train.checkpoint import export_model
    from ranray.evaluation import evaluate

    cfg = tiny_config(data_dir, tmp_path, "eval")
    model, _ = export_model(build_ran(cfg.model).state_dict(), cfg, tmp_path / "model" / "best.pt")
    master, slave = terminal_pair()
    with os.fdopen(slave, "w") as terminal:
        report = evaluate(model, data_dir, "test", batch_size=8, out_dir=tmp_path / "a", progress=terminal)
        shown = read_pty(master)
    os.close(master)
    assert report.metrics["test_samples"] == 32
    assert "evaluating test" in shown and "4/4" in shown and "batch/s" in shown, shown
    with open(tmp_path / "pipe.txt", "w") as file:
        evaluate(model, data_dir, "test", batch_size=8, out_dir=tmp_path / "b", progress=file)
    assert (tmp_path / "pipe.txt").read_text() == ""
