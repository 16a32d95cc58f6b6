"""`ranray demo` end to end, shrunk: 160 synthetic faces, one epoch (the full demo's accuracy is
measured outside the test suite, it takes minutes)."""

from __future__ import annotations

import argparse
import json

from ranray.cli import main
from ranray.commands.demo import prepare_data
from ranray.tracking import find_runs


def test_demo_runs_every_stage_and_prints_the_summary(ray_session, tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir), "--n", "160", "epochs=1", "batch_size=8",
                 "model.num_regions=3"]) == 0
    out = capsys.readouterr().out
    for line in ("prepared ferplus", "test accuracy, all faces", "test accuracy, clean faces",
                 "test accuracy, occluded", "MLflow run", "mlflow ui --backend-store-uri"):
        assert line in out, line
    assert (workdir / "prepared" / "manifest.json").is_file()
    (run_dir,) = (workdir / "runs").iterdir()
    for path in ("model/best.pt", "model/final.pt", "plots/confusion_val.png", "plots/attention_faces.png",
                 "eval_test/confusion_test.png"):
        assert (run_dir / path).is_file(), path
    report = json.loads((run_dir / "eval_test" / "eval_test.json").read_text())
    assert report["metrics"]["test_samples"] > 0 and "test_acc_occlusion" in report["metrics"]
    (run,) = find_runs(f"sqlite:///{run_dir / 'mlflow.db'}", "ranray-demo")
    assert run["status"] == "FINISHED"


    # A later demo reuses the prepared data only when it was made with the same options.
    first = (workdir / "prepared" / "manifest.json").stat().st_mtime_ns
    prepare_data(workdir, argparse.Namespace(n=160, seed=0, fresh=False), {})
    assert "reusing the prepared synthetic data" in capsys.readouterr().out
    assert (workdir / "prepared" / "manifest.json").stat().st_mtime_ns == first
    prepare_data(workdir, argparse.Namespace(n=120, seed=0, fresh=False), {})
    assert "made with other options" in capsys.readouterr().out
    assert json.loads((workdir / "prepared" / "manifest.json").read_text())["rows_in"] == 120
