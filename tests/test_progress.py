"""Progress bars: the training bar (rank 0's Hook, drawn by the driver through Ray's log stream),
the driver's terminal check, and offline evaluation's bar on a terminal (a real pty)."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import termios
from pathlib import Path

import pytest
from train_fixtures import learnable_dataset, tiny_config

from ranray.train.launch import run_training
from ranray.train.progress import resolve_progress


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return learnable_dataset(tmp_path_factory.mktemp("progress") / "ds")


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


def test_auto_means_a_bar_only_when_the_drivers_stdout_is_a_terminal(tmp_path):
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as terminal, open(tmp_path / "log.txt", "w") as file:
        assert resolve_progress("auto", terminal) == "on"
        assert resolve_progress("auto", file) == "off"  # e.g. `ray job submit`, or `> train.log`
        assert resolve_progress("on", file) == "on" and resolve_progress("off", terminal) == "off"
    os.close(master)
    with pytest.raises(ValueError, match="run.progress"):
        resolve_progress("sometimes")


def test_training_bar_shows_epoch_loss_throughput_and_eta_on_the_driver(ray_session, data_dir, tmp_path, capfd):
    cfg = tiny_config(data_dir, tmp_path, "bar", "epochs=2", hooks=("ranray.train.progress:forced",))
    result = run_training(cfg)
    assert result.metrics["step"] == 12
    err = capfd.readouterr().err
    # tqdm's last frame of each epoch's bar: description, 6/6 steps, elapsed<remaining, rate.
    # (tqdm_ray's driver side scales units: 6.00/6.00)
    finals = re.findall(r"epoch (\d)/2 loss (\d+\.\d+) (\d+) img/s: 100%\|[^|]*\| 6(?:\.00)?/6(?:\.00)? "
                        r"\[\d\d:\d\d<00:00, \d+\.\d+(?:step/s|s/step)\]", err)
    assert sorted(set(e for e, _, _ in finals)) == ["1", "2"], err[-3000:]
    assert all(float(loss) > 0 and int(rate) > 0 for _, loss, rate in finals)


def test_evaluation_bar_on_a_terminal_and_none_on_a_pipe(data_dir, tmp_path):
    from ranray.models import build_ran
    from ranray.train.checkpoint import export_model
    from ranray.train.evaluate import evaluate

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
