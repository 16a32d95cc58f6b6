"""The shipped jobs on this CPU and on the other kind (ONEDNN_MAX_CPU_ISA=AVX2 makes an AVX-512
machine take a plain AVX2 machine's kernels): every job in jobs/ resolves to settings that train
without crashing, and the demo's own config runs real training steps and a whole short run through
the local runtime (`ranray train --local`; the demo config on Ray Train workers: test_demo).

A native crash kills the process it happens in, so every payload runs in a child process and a
death by signal fails the test with the signal's name, not pytest with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from train_fixtures import NUM_CLASSES

from ranray.config import PretrainConfig, TrainConfig, load_config
from ranray.hardware import CpuInfo, HardwareError, cpu_info
from ranray.train.checkpoint import STATE_FILE, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "demo.yaml"
CPU = torch.device("cpu")
ISA_PATHS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}


def run_child(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if done.returncode < 0:
        pytest.fail(f"{' '.join(args[:3])} died of {signal.Signals(-done.returncode).name} with {env or 'no ISA cap'} "
                    f"on {cpu_info().describe()}:\n{done.stderr[-2000:]}")
    return done


@pytest.fixture(scope="module")
def children(data_dir, tmp_path_factory) -> dict[str, tuple[Future, Path]]:
    """The module's three `ranray train --local` children, run at once: each is one process on one
    core (OMP_NUM_THREADS=1), most of it imports and set-up, so on 2 cores the three together take
    about half their time one after the other. name -> (the child's CompletedProcess, its storage)."""
    common = [sys.executable, "-m", "ranray.cli", "train", "--local", "--config", str(DEMO), f"data.dir={data_dir}",
              f"model.num_classes={NUM_CLASSES}", "scaling.num_workers=1", "epochs=1"]
    # Two steps of the demo's model on each CPU path; the demo config as shipped, one short epoch.
    runs = {isa: (ISA_PATHS[isa], ["run.name=steps", "max_steps=2"], 300) for isa in ISA_PATHS}
    runs["shipped"] = ({}, ["run.name=demo-config"], 600)
    with ThreadPoolExecutor(len(runs), thread_name_prefix="child") as pool:
        started = {}
        for name, (env, args, timeout) in runs.items():
            storage = tmp_path_factory.mktemp(name)
            args = [*common, f"run.storage_path={storage}", *args]
            started[name] = (pool.submit(run_child, args, env, timeout), storage)
        return started


@pytest.mark.parametrize("isa", sorted(ISA_PATHS))
def test_demo_config_trains_on_both_cpu_paths(isa, children):
    """Two steps of the demo's model through the engine on the local runtime (`ranray train --local`),
    with the precision and memory format the engine resolves for this CPU: the kernels (convolutions
    forward and backward in that precision and format) are the ones that crashed."""
    child, storage = children[isa]
    done = child.result()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]  # a loss that is not finite fails
    expected = "bf16" if isa == "native" and cpu_info().native_bf16 else "fp32"
    assert f"on cpu: precision {expected}, channels_last " in done.stdout
    state = load_checkpoint(storage / "steps" / f"checkpoint_{2:08d}_g00" / STATE_FILE)
    assert state["step"] == 2 and state["config"]["precision"] == "auto"


def test_shipped_demo_config_trains_through_ranray_train(children):
    """jobs/demo.yaml as shipped, through the real CLI, one short epoch: on the local runtime, so on one
    worker (`ranray demo` trains it on 2 Ray Train workers: test_demo)."""
    child, storage = children["shipped"]
    done = child.result()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "val accuracy (last / best)" in done.stdout
    assert (storage / "demo-config" / "model" / "final.pt").is_file()


CPU_KINDS = (CpuInfo("avx512 + bf16", frozenset({"avx2", "avx512f", "avx512_bf16"}), ""),
             CpuInfo("avx512 capped to AVX2", frozenset({"avx2", "avx512f", "avx512_bf16"}), "AVX2"),
             CpuInfo("avx2 only", frozenset({"avx2"}), ""))
TRAINING_JOBS = {"demo.yaml": TrainConfig, "ferplus_cpu.yaml": TrainConfig, "ferplus_ran_r50.yaml": TrainConfig,
                 "ferplus_ran_paper.yaml": TrainConfig,
                 "pretrain_r50.yaml": PretrainConfig}


def test_every_training_job_is_listed():
    jobs = {p.name for p in (REPO / "jobs").glob("*.yaml")}
    assert jobs - set(TRAINING_JOBS) == {"ferplus_prepare.yaml", "tune_asha.yaml"}  # no precision to choose


@pytest.mark.parametrize("job", sorted(TRAINING_JOBS))
@pytest.mark.parametrize("cpu", CPU_KINDS, ids=lambda c: c.model)
def test_every_shipped_job_resolves_to_safe_settings(job, cpu, monkeypatch):
    import ranray.hardware as hw

    monkeypatch.setattr(hw, "cpu_info", lambda: cpu)
    cfg = load_config(TRAINING_JOBS[job], REPO / "jobs" / job, ["data.dir=unused"])
    precision = hw.resolve_precision(cfg.precision, CPU)
    nhwc = hw.resolve_channels_last(cfg.data.channels_last, CPU, precision)
    assert not (cpu.avx512 and nhwc and precision == "fp32")  # the crashing kernel
    assert precision == ("bf16" if cpu.native_bf16 else "fp32")


def test_auto_rules_follow_the_measured_cpu_kinds(monkeypatch):
    import ranray.hardware as hw

    fast = CpuInfo("avx512 + bf16", frozenset({"avx2", "avx512f", "avx512_bf16"}), "")
    plain = CpuInfo("avx2 only", frozenset({"avx2"}), "")
    monkeypatch.setattr(hw, "cpu_info", lambda: fast)
    assert hw.resolve_precision("auto", CPU) == "bf16"
    assert hw.resolve_channels_last("auto", CPU, "bf16") is False
    with pytest.raises(HardwareError, match="data.channels_last"):
        hw.resolve_channels_last(True, CPU, "fp32")
    assert hw.resolve_channels_last(True, CPU, "bf16") is True  # the bf16 kernels are another path
    assert hw.resolve_precision("fp32", CPU) == "fp32"
    monkeypatch.setattr(hw, "cpu_info", lambda: plain)
    assert hw.resolve_precision("auto", CPU) == "fp32"
    assert hw.resolve_channels_last("auto", CPU, "fp32") is True
    capped = CpuInfo("capped", fast.flags, "AVX2")
    assert not capped.avx512 and not capped.native_bf16


def test_version_prints_the_cpu_features():
    done = subprocess.run([sys.executable, "-m", "ranray.cli", "version"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert done.returncode == 0, done.stderr
    assert "ONEDNN_MAX_CPU_ISA=AVX2 -> AVX-512 path no, native bf16 no" in done.stdout
    assert "oneDNN " in done.stdout and "auto choices: on cpu: precision fp32" in done.stdout
