"""A prepare whose driver is SIGKILLed part-way, run again with the same command, keeps the blocks it
had committed, aligns only the rest, and ends equal to an uninterrupted run (same keys, labels,
images and counts; no row twice, none lost)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from cluster_utils import processes_titled

from ranray import cli
from ranray.data.schema import read_manifest, shard_paths


def _rows(out: Path) -> dict[str, tuple]:
    manifest = read_manifest(out)
    rows = {}
    for split in manifest["splits"]:
        for r in pq.read_table(shard_paths(out, split), columns=["key", "label", "split", "image"]).to_pylist():
            assert r["key"] not in rows, f"{r['key']} written twice"
            rows[r["key"]] = (r["split"], r["label"], r["image"])
    return rows


def _rejects(out: Path) -> dict[str, str]:
    return {r["key"]: r["reason"] for r in pq.read_table(out / "rejects.parquet").to_pylist()}


def _committed(work: Path) -> list[str]:
    return sorted(p.stem for p in (work / "blocks").glob("*.json")) if (work / "blocks").is_dir() else []


def test_driver_killed_mid_run_resumes_to_the_uninterrupted_result(ray_session, tmp_path, capsys):
    from ranray.data.synth import SynthOptions, synthesize

    raw = synthesize(tmp_path / "raw", SynthOptions(n=600, seed=8, non_face_frac=0.02))
    argv = ["prepare", "ferplus", str(raw.root), "num_workers=2"]
    assert cli.main(argv + ["--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()

    out, work = tmp_path / "resumed", tmp_path / ".resumed.partial"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = (tmp_path / "child.log").open("w")
    child = subprocess.Popen([sys.executable, "-m", "ranray.cli", *argv, "--out", str(out)], env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while len(_committed(work)) < 4 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    while processes_titled("ray::", containing="BlockPreparer") and time.monotonic() < deadline:
        time.sleep(0.2)  # the killed driver's actors go with its job
    kept = _committed(work)
    assert (work / "plan.json").is_file(), (tmp_path / "child.log").read_text()[-3000:]
    blocks = json.loads((work / "plan.json").read_text())["blocks"]
    assert not out.exists() and 4 <= len(kept) < blocks, (kept, blocks)

    assert cli.main(argv + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"resuming: {len(kept)} block(s) of a killed run kept" in printed
    assert f"{len(kept)} blocks kept from a killed run" in printed.splitlines()[-1]

    whole, resumed = read_manifest(tmp_path / "whole"), read_manifest(out)
    for key in ("rows_in", "rows_written", "rows_rejected", "rejects_by_reason", "num_classes"):
        assert resumed[key] == whole[key], key
    assert resumed["rows_in"] == 600 == resumed["rows_written"] + resumed["rows_rejected"]
    assert {s: (v["rows"], v["per_class"]) for s, v in resumed["splits"].items()} == {
        s: (v["rows"], v["per_class"]) for s, v in whole["splits"].items()}
    assert _rows(out) == _rows(tmp_path / "whole")  # same faces, bytes and all
    assert _rejects(out) == _rejects(tmp_path / "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.log", "raw", "resumed", "whole"]  # work folder renamed


def test_a_killed_run_of_other_settings_is_not_resumed(ray_session, tmp_path, capsys):
    from ranray.data.synth import SynthOptions, synthesize

    raw = synthesize(tmp_path / "raw", SynthOptions(n=40, seed=9, non_face_frac=0.0))
    work = tmp_path / ".out.partial"
    work.mkdir()
    (work / ".ranray-prepare").write_text("ranray prepare work folder\n")
    (work / "plan.json").write_text(json.dumps({"fingerprint": "of another run", "blocks": 3}))
    (work / "blocks").mkdir()
    (work / "blocks" / "000000.json").write_text("{}")  # would break the manifest if it were kept
    assert cli.main(["prepare", "ferplus", str(raw.root), "--out", str(tmp_path / "out"), "num_workers=1"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert read_manifest(tmp_path / "out")["rows_written"] == 40
