"""Occlusion study: does region attention beat the whole-face baseline on occluded faces, over seeds?

For every seed the study draws its own synthetic FERPlus set (ranray.data.synth, seed 1000 + s, so
it is independent of `ranray synth`'s and the demo's faces): training and validation faces occluded
at --train-occlusion (20%), test faces at --test-occlusion (50%), the occluders one face region
each (sunglasses = eyes, mask = mouth and nose, a card over the image-left or image-right half), 15%
turned 30-60 degrees. It prepares the set with the real `ranray prepare` code (Ray Data, dlib
alignment), then trains every variant with the demo job (jobs/demo.yaml: iresnet_tiny, 2 Ray Train
workers, random erasing) at the same epochs through ranray.train.launch.run_training, evaluates the
best model on the test split (clean faces, occluded faces, pose > 30 degrees), and for the region
variants measures whether attention follows occlusion (ranray.train.occlusion: cover each region of
clean test faces, read its mu again). Every finished run is appended to <workdir>/runs.jsonl, so an
interrupted study keeps its runs and a rerun with the same --workdir skips them.

The table gives mean +- std over seeds of each accuracy, and the gap to the whole-face baseline of
the same seed (mean +- std of the per-seed differences); "meets" marks a variant that is at least 5
points better on occluded faces with the gap above twice its std, and no worse on clean faces (the
bar of issue 16). It is appended to bench/RESULTS.md, and the baseline's and the demo
configuration's figures go to bench/occlusion_baseline.json for the demo summary.

    .venv/bin/python bench/occlusion.py --quick          # minutes: 2 seeds, 2 variants
    .venv/bin/python bench/occlusion.py                  # ~31 min on 2 quiet cores, nothing else running
    .venv/bin/python bench/occlusion.py --variants ran_crop_0.75,ran_landmark   # ~6 min a variant
    .venv/bin/python bench/occlusion.py --full                       # a bigger machine: all variants
    .venv/bin/python bench/occlusion.py --data runs/my_prepared      # a prepared set with occlusion flags
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import report  # noqa: E402

from ranray.config import TrainConfig, load_config  # noqa: E402
from ranray.data.synth import SynthOptions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_JOB = REPO / "jobs" / "demo.yaml"
BASELINE_JSON = Path(__file__).with_name("occlusion_baseline.json")
DATA_SEED_OFFSET = 1000  # the study's faces are never the demo's (seed 0) or a test's
STUDY_OCCLUDERS = ("half_left", "half_right", "mask", "sunglasses")
BASELINE = "whole_face"
DEMO_VARIANT = "ran"  # the demo job as it is
BAR_POINTS = 5.0  # issue 16: RAN must beat the baseline on occluded faces by this much


@dataclass(frozen=True)
class Size:
    train: int  # training faces
    val: int
    test: int
    epochs: int
    seeds: int
    variants: tuple[str, ...]


# Variant -> the demo job's overrides; "epochs_x" scales the size's epochs (the baseline at equal compute).
VARIANTS: dict[str, dict] = {
    "whole_face": {"overrides": ["model.variant=whole_face"]},
    "ran": {"overrides": []},
    "ran_sigmoid": {"overrides": ["loss.rb_space=sigmoid"]},
    "no_rb_loss": {"overrides": ["model.variant=no_rb_loss"]},
    "whole_face_4x": {"overrides": ["model.variant=whole_face"], "epochs_x": 4},
    "ran_4x": {"overrides": [], "epochs_x": 4},  # does RAN catch up given the baseline's longer run?
    "no_relation": {"overrides": ["model.variant=no_relation"]},
    "ran_margin_0.02": {"overrides": ["loss.rb_margin=0.02"]},
    "ran_sigmoid_margin_0.3": {"overrides": ["loss.rb_space=sigmoid", "loss.rb_margin=0.3"]},
    "ran_crop_0.75": {"overrides": ["model.crop_frac=0.75"]},
    "ran_landmark": {"overrides": ["model.region_mode=landmark", "model.num_regions=6"]},
    "ran_random": {"overrides": ["model.region_mode=random"]},
    "ran_random_no_rb_loss": {"overrides": ["model.region_mode=random", "model.variant=no_rb_loss"]},
    "ran_k4": {"overrides": ["model.num_regions=4"]},
    "ran_no_erase": {"overrides": ["data.augment.erase_prob=0"]},
    "whole_face_no_erase": {"overrides": ["model.variant=whole_face", "data.augment.erase_prob=0"]},
}
# The default size: the RB-loss question and the baseline at about RAN's compute, ~31 min on 2
# quiet cores (whole face ~55 s a run, RAN ~115 s, the 4x baseline ~170 s); every other variant
# adds ~6 min for 3 seeds (--variants NAME; the same --workdir keeps the runs already made).
DEFAULT_VARIANTS = ("whole_face", "ran", "ran_sigmoid", "no_rb_loss", "whole_face_4x")
SIZES: dict[str, Size] = {
    "quick": Size(train=240, val=48, test=160, epochs=1, seeds=2, variants=("whole_face", "ran")),
    "default": Size(train=800, val=100, test=400, epochs=4, seeds=3, variants=DEFAULT_VARIANTS),
    "full": Size(train=2400, val=300, test=600, epochs=4, seeds=3, variants=tuple(VARIANTS)),
}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def synth_options(size: Size, seed: int, args: argparse.Namespace) -> SynthOptions:
    n = size.train + size.val + size.test
    return SynthOptions(n=n, seed=DATA_SEED_OFFSET + seed, format="ferplus",
                        split_fracs=(size.train / n, size.val / n, size.test / n),
                        occlusion_frac=args.train_occlusion, test_occlusion_frac=args.test_occlusion,
                        occluders=STUDY_OCCLUDERS, large_pose_frac=0.15)


def prepare_seed(workdir: Path, opts: SynthOptions) -> Path:
    """Synthesize and prepare one seed's set (kept and reused when made with the same options)."""
    from ranray.data.prepare import prepare_synthetic

    raw, out = workdir / f"data{opts.seed}" / "synth", workdir / f"data{opts.seed}" / "prepared"
    made_with = out.parent / "options.json"
    wanted = json.loads(json.dumps(asdict(opts)))
    if (out / "manifest.json").is_file() and made_with.is_file() and json.loads(made_with.read_text()) == wanted:
        return out
    print(prepare_synthetic(raw, out, opts, overwrite=True).line(), flush=True)
    made_with.write_text(json.dumps(wanted))
    return out


def check_occlusion_flags(data_dir: Path, split: str = "test") -> int:
    """Occluded faces in the split; refuse (SystemExit) a dataset without any: nothing to measure."""
    from ranray.data.schema import DatasetError
    from ranray.data.shards import build_index

    try:
        occluded = build_index(data_dir, split, "occlusion").num_rows
    except DatasetError as exc:
        raise SystemExit(f"bench/occlusion.py: --data {data_dir} is not a prepared dataset with a '{split}' split: "
                         f"{exc}") from exc
    if occluded == 0:
        raise SystemExit(f"bench/occlusion.py: {data_dir} split '{split}' has no faces flagged 'occlusion' "
                         f"(subset_lists.occlusion at prepare time): there is no occluded accuracy to compare; "
                         f"prepare it with an occlusion list, or let the study synthesize its own faces")
    return occluded


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


def run_config(variant: str, seed: int, epochs: int, data_dir: Path, workdir: Path,
               extra: list[str]) -> TrainConfig:
    spec = VARIANTS[variant]
    return load_config(TrainConfig, DEMO_JOB, [
        f"data.dir={data_dir}", f"run.storage_path={workdir / 'runs'}", f"run.name={variant}-s{seed}",
        f"run.seed={seed}", f"epochs={epochs * spec.get('epochs_x', 1)}", *spec["overrides"], *extra])


def train_and_measure(cfg: TrainConfig, attention_faces: int) -> dict:
    from ranray.train.evaluate import evaluate
    from ranray.train.launch import run_training
    from ranray.train.occlusion import report_trained

    started = time.perf_counter()
    result = run_training(cfg)
    train_s = time.perf_counter() - started
    m = evaluate(result.best_model, cfg.data.dir, cfg.data.test_split, out_dir=result.run_dir / "eval_test").metrics
    row = {"clean": m["test_acc_clean"], "occluded": m["test_acc_occlusion"], "pose30": m.get("test_acc_pose30"),
           "all": m["test_accuracy"], "train_s": train_s, "load": os.getloadavg()[0], "run_dir": str(result.run_dir)}
    if cfg.model.variant != BASELINE and attention_faces > 0:
        shift, _ = report_trained(result.best_model, cfg.data.dir, result.run_dir / "attention_shift",
                                  cfg.data.test_split, max_faces=attention_faces,
                                  tracking_uri=result.tracking_uri, mlflow_run_id=result.mlflow_run_id)
        rows = shift.summary()
        row["mu_own"] = statistics.fmean(r["own_mean"] for r in rows)
        row["mu_own_minus_others"] = statistics.fmean(r["own_mean"] - r["others_mean"] for r in rows)
        row["mu_own_fell"] = statistics.fmean(r["own_fell"] for r in rows)
    return row


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "n/a"
    return f"{statistics.fmean(vals):.{digits}f} +- {statistics.stdev(vals) if len(vals) > 1 else 0.0:.{digits}f}"


def paired_gap(runs: dict[tuple[str, int], dict], variant: str, key: str) -> list[float]:
    seeds = sorted(s for v, s in runs if v == variant and (BASELINE, s) in runs)
    return [100 * (runs[(variant, s)][key] - runs[(BASELINE, s)][key]) for s in seeds]


def meets_bar(occ_gap: list[float], clean_gap: list[float]) -> bool:
    if len(occ_gap) < 2:
        return False
    mean, std = statistics.fmean(occ_gap), statistics.stdev(occ_gap)
    return mean >= BAR_POINTS and mean > 2 * std and statistics.fmean(clean_gap) >= 0.0


def table(runs: dict[tuple[str, int], dict], variants: tuple[str, ...]) -> tuple[list[str], list[list]]:
    headers = ["variant", "seeds", "clean %", "occluded %", "pose>30 %", "occluded gap vs whole face (pts)",
               "clean gap (pts)", "covered region's mu change", "own - others", "train s", "meets bar"]
    rows = []
    for v in variants:
        got = [runs[(v, s)] for (name, s) in sorted(runs) if name == v]
        if not got:
            continue
        occ_gap, clean_gap = paired_gap(runs, v, "occluded"), paired_gap(runs, v, "clean")
        rows.append([v, len(got), mean_std([r["clean"] for r in got]), mean_std([r["occluded"] for r in got]),
                     mean_std([r["pose30"] for r in got]),
                     "-" if v == BASELINE else mean_std(occ_gap, 1.0),
                     "-" if v == BASELINE else mean_std(clean_gap, 1.0),
                     mean_std([r.get("mu_own") for r in got], 1.0, 3).replace("n/a", "-"),
                     mean_std([r.get("mu_own_minus_others") for r in got], 1.0, 3).replace("n/a", "-"),
                     f"{statistics.fmean(r['train_s'] for r in got):.0f}",
                     "-" if v == BASELINE else ("yes" if meets_bar(occ_gap, clean_gap) else "no")])
    return headers, rows


def baseline_summary(runs: dict[tuple[str, int], dict], size_name: str, size: Size) -> dict:
    """What the demo summary prints beside RAN's occluded accuracy."""
    def stats(v: str) -> dict:
        got = [runs[(v, s)] for (name, s) in sorted(runs) if name == v]
        return {k: round(statistics.fmean(r[k] for r in got), 4) for k in ("clean", "occluded")} | {"seeds": len(got)}

    out = {"size": size_name, "train_faces": size.train, "epochs": size.epochs, "test_faces": size.test,
           "date": time.strftime("%Y-%m-%d"), "job": "jobs/demo.yaml"}
    for v in (BASELINE, DEMO_VARIANT):
        if any(name == v for name, _ in runs):
            out[v] = stats(v)
    return out


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="size", const="quick", help="minutes: a smoke run")
    size.add_argument("--full", action="store_const", dest="size", const="full", help="every variant, 2400 faces")
    p.set_defaults(size="default")
    p.add_argument("--variants", help=f"comma list of {', '.join(VARIANTS)} (default: the size's)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the size's)")
    p.add_argument("--epochs", type=int, help="epochs of every variant (default: the size's)")
    p.add_argument("--train-occlusion", type=float, default=0.2, help="occluded share of train/val faces")
    p.add_argument("--test-occlusion", type=float, default=0.5, help="occluded share of test faces")
    p.add_argument("--attention-faces", type=int, default=96, help="clean test faces covered region by region")
    p.add_argument("--data", help="a prepared dataset to use for every seed instead of synthesizing")
    p.add_argument("--workdir", default="runs/occlusion", help="data, runs and runs.jsonl (default runs/occlusion)")
    p.add_argument("--no-results", action="store_true", help="print the table only (no RESULTS.md, no json)")
    p.add_argument("--table-only", action="store_true",
                   help="no training: the table of the runs already in <workdir>/runs.jsonl")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra overrides of every run's config")
    return p.parse_args(argv)


def resolve_size(args: argparse.Namespace) -> Size:
    size = SIZES[args.size]
    variants = tuple(args.variants.split(",")) if args.variants else size.variants
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench/occlusion.py: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if BASELINE not in variants:
        variants = (BASELINE, *variants)  # every gap is measured against it
    return replace(size, variants=variants, seeds=args.seeds or size.seeds, epochs=args.epochs or size.epochs)


def load_runs(path: Path) -> dict[tuple[str, int], dict]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["variant"], r["seed"]): r for r in rows}


def main(argv: list[str] | None = None) -> int:
    from ranray.ray_runtime import ensure_ray

    args = parse_args(argv)
    size = resolve_size(args)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "runs.jsonl"
    if args.table_only:
        return write_table(args, size, load_runs(log_path))
    for v in size.variants:  # every config is checked before any data is made
        run_config(v, 0, size.epochs, workdir, workdir, args.overrides)
    if args.data:
        check_occlusion_flags(Path(args.data).resolve())
    ensure_ray()
    data = {s: Path(args.data).resolve() if args.data else prepare_seed(workdir, synth_options(size, s, args))
            for s in range(size.seeds)}
    flagged = {s: check_occlusion_flags(d) for s, d in data.items()}  # refused before any training
    print(f"occluded test faces per seed: {flagged}", flush=True)
    runs = load_runs(log_path)
    for s in range(size.seeds):
        for v in size.variants:
            key = (v, s)
            expected = {"epochs": size.epochs, "train": size.train}
            if key in runs and all(runs[key].get(k) == x for k, x in expected.items()):
                continue
            print(f"[occlusion] {v} seed {s}: training ({time.strftime('%H:%M:%S')}, "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
            row = train_and_measure(run_config(v, s, size.epochs, data[s], workdir, args.overrides),
                                    args.attention_faces)
            row.update(variant=v, seed=s, **expected)
            runs[key] = row
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[occlusion] {v} seed {s}: clean {row['clean']:.3f}, occluded {row['occluded']:.3f}, "
                  f"{row['train_s']:.0f} s", flush=True)
    return write_table(args, size, runs)


def write_table(args: argparse.Namespace, size: Size, runs: dict[tuple[str, int], dict]) -> int:
    runs = {k: r for k, r in runs.items() if k[1] < size.seeds and k[0] in size.variants}
    headers, rows = table(runs, size.variants)
    loads = [r["load"] for r in runs.values()] or [os.getloadavg()[0]]
    notes = (f"size {args.size}: {size.train} train / {size.val} val / {size.test} test faces per seed "
             f"(train occluded {args.train_occlusion:.0%}, test {args.test_occlusion:.0%}: "
             f"{', '.join(STUDY_OCCLUDERS)}), jobs/demo.yaml (iresnet_tiny, 2 workers), {size.epochs} epochs, "
             f"seeds 0..{size.seeds - 1}; accuracy of the best-val model on the test split, mean +- std over seeds; "
             f"gaps paired by seed; mu change: a region's self-attention weight with that region covered minus "
             f"clean, mean over regions, on {args.attention_faces} clean test faces; bar: occluded gap >= "
             f"{BAR_POINTS:g} pts and > 2 std, clean gap >= 0. {cpu_line()}; 1-min load at the end of the runs "
             f"{min(loads):.1f}..{max(loads):.1f}, at the table "
             f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.no_results:
        from _results import markdown_table

        print(markdown_table(headers, rows) + "\n\n" + notes)
    else:
        report("Occlusion study: RAN variants vs the whole-face baseline (bench/occlusion.py)", headers, rows, notes)
        BASELINE_JSON.write_text(json.dumps(baseline_summary(runs, args.size, size), indent=1) + "\n")
    return 0


def cpu_line() -> str:
    from ranray.hardware import cpu_info

    return f"CPU flags: {cpu_info().describe()}"


if __name__ == "__main__":
    sys.exit(main())
