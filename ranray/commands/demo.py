"""`ranray demo` (`make demo`): the whole system on this machine, no GPU needed.

    synthetic FERPlus (ranray.data.synth) -> prepare on Ray Data (dlib alignment, Parquet shards)
    -> fine-tune RAN (iresnet_tiny, 2 Ray Train workers on CPU, jobs/demo.yaml) -> evaluate on the
    test split -> a summary: accuracy overall, on clean faces and on the occluded / turned subsets,
    what the model was trained on (synthetic faces: said plainly, with what that means for real
    photographs), where the artifacts and the MLflow run are, and the command that opens the MLflow UI.

The synthetic and prepared data are kept in the work dir and reused by the next demo (--fresh
regenerates them); every demo trains a new run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

HELP = "end to end without a GPU: synthetic FERPlus -> prepare (Ray Data) -> train RAN (Ray Train) -> evaluate"
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "demo.yaml"
TARGET_CLEAN_ACCURACY = 0.80


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="runs/demo", help="where data, runs and MLflow go (default runs/demo)")
    parser.add_argument("--n", type=int, default=2000, help="synthetic images (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="the training job (default jobs/demo.yaml)")
    parser.add_argument("--fresh", action="store_true", help="regenerate the synthetic and prepared data")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides, e.g. epochs=2")


def run(args: argparse.Namespace) -> int:
    from ranray.config import ConfigError, TrainConfig, load_config
    from ranray.ray_runtime import ensure_ray
    from ranray.evaluation import evaluate
    from ranray.train.launch import run_training

    begun = time.perf_counter()

    if not Path(args.config).is_file():
        raise ConfigError(f"demo training config {args.config} not found (run from the repository, or pass --config)")
    workdir = Path(args.workdir).resolve()
    data_dir = workdir / "prepared"
    # The training config is checked before anything is generated or started.
    cfg = load_config(TrainConfig, args.config, [
        f"data.dir={data_dir}", f"run.storage_path={workdir / 'runs'}",
        f"run.name=demo-{time.strftime('%Y%m%d-%H%M%S')}", *args.overrides])
    times: dict[str, float] = {}
    ensure_ray()  # one local Ray for prepare and training
    prepare_data(workdir, args, times)
    started = time.perf_counter()
    result = run_training(cfg)
    times["train"] = time.perf_counter() - started
    started = time.perf_counter()
    report = evaluate(result.best_model, data_dir, cfg.data.test_split, out_dir=result.run_dir / "eval_test")
    times["evaluate"] = time.perf_counter() - started
    print(summary(result, report, times, time.perf_counter() - begun))
    return 0


def prepare_data(workdir: Path, args: argparse.Namespace, times: dict[str, float]) -> None:
    """Synthesize and prepare (on Ray Data) into workdir/prepared, unless an earlier demo did."""
    synth_dir, data_dir, made_with = workdir / "synth", workdir / "prepared", workdir / "data_options.json"
    wanted = {"n": args.n, "seed": args.seed}
    if (data_dir / "manifest.json").is_file() and not args.fresh:
        if made_with.is_file() and json.loads(made_with.read_text()) == wanted:
            print(f"reusing the prepared synthetic data in {data_dir} (--fresh regenerates it)")
            return
        print(f"the data in {data_dir} was made with other options than {wanted}: regenerating it")
    from ranray.data.prepare import prepare
    from ranray.data.synth import SynthOptions, synthesize

    shutil.rmtree(synth_dir, ignore_errors=True)
    started = time.perf_counter()
    synth = synthesize(synth_dir, SynthOptions(n=args.n, seed=args.seed, format="ferplus"))
    times["synth"] = time.perf_counter() - started
    started = time.perf_counter()
    summary_line = prepare(synth.prepare_config(data_dir, overwrite=True)).line()
    times["prepare"] = time.perf_counter() - started
    made_with.write_text(json.dumps(wanted))
    print(summary_line)


# What region attention buys on the demo's job: bench/occlusion.py's figures (docs/OCCLUSION.md), which
# that study writes here when it runs the demo job unchanged; shipped with the package.
OCCLUSION_STUDY = Path(__file__).with_name("occlusion_study.json")


def occlusion_study_line() -> str:
    """The occlusion study's RAN and whole-face figures beside the demo's own, when the study has run."""
    try:
        b = json.loads(OCCLUSION_STUDY.read_text())
        return (f" (occlusion study, {b['size']} size, {b['whole_face']['seeds']} seeds on its own faces: "
                f"whole-face baseline {b['whole_face']['occluded']:.3f}, "
                f"RAN ({b.get('region_features', 'crops')} regions) {b['ran']['occluded']:.3f}; "
                "docs/OCCLUSION.md)")
    except (OSError, ValueError, KeyError):
        return ""


def summary(result, report, times: dict[str, float], total_s: float) -> str:
    from ranray.model_card import describe, synthetic_warning
    from ranray.train.summary import format_table

    m = report.metrics
    pre = f"{report.split}_"

    def acc(key: str) -> str:
        value = m.get(pre + key, math.nan)
        return "n/a" if math.isnan(value) else f"{value:.3f}"

    clean = m.get(pre + "acc_clean", math.nan)
    verdict = "meets" if clean >= TARGET_CLEAN_ACCURACY else "below"
    rows = [
        ("test accuracy, all faces", f"{acc('accuracy')} ({int(m.get(pre + 'samples', 0))} faces)"),
        ("test accuracy, clean faces", f"{acc('acc_clean')} ({verdict} the {TARGET_CLEAN_ACCURACY:.0%} target)"),
        ("test accuracy, occluded", acc("acc_occlusion") + occlusion_study_line()),
        ("test accuracy, pose > 30 deg", acc("acc_pose30")),
        ("test accuracy, pose > 45 deg", acc("acc_pose45")),
        ("best val accuracy", f"{result.metrics.get('best_val_accuracy', math.nan):.3f}"),
        ("trained on", describe(report.trained_on)),
        ("time", ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {total_s:.0f} s"),
        ("run dir", str(result.run_dir)),
        *[(k.replace("_", " "), str(v)) for k, v in result.artifacts.items()],
        ("test report", report.files["json"]),
        ("test confusion", report.files["confusion"]),
        ("MLflow run", f"{result.mlflow_run_id} ({result.tracking_uri})"),
        ("open the MLflow UI", result.ui_command),
    ]
    warning = synthetic_warning(report.trained_on)
    return "\nranray demo: done\n" + format_table(rows) + (f"\n\n{warning}" if warning else "")
