"""Occlusion study: does region attention beat the whole-face baseline on occluded and turned faces, over seeds?

Two kinds of data:

- synthetic (the default): for every seed the study draws its own synthetic FERPlus set
  (ranray.data.synth, seed 1000 + s, so it is independent of `ranray synth`'s and the demo's faces):
  training and validation faces occluded at --train-occlusion (20%), test faces at --test-occlusion
  (50%), the occluders one face region each (sunglasses = eyes, mask = mouth and nose, a card over the
  image-left or image-right half), 15% turned 30-60 degrees, prepared with the real `ranray prepare`
  code (Ray Data, dlib alignment).
- `--data DIR`: a prepared dataset with subset flags, e.g. the real FERPlus prepared with RAN's
  occlusion / pose-30 / pose-45 lists (docs/REPRODUCE.md). Every seed trains on the same set; only
  run.seed differs. A test split without any face flagged `occlusion` is refused before training.

Every variant is the job (--job, default jobs/demo.yaml: iresnet_tiny, 2 Ray Train workers, random
erasing) with the variant's overrides, then the command line's KEY=VALUE overrides, trained through
ranray.train.launch.run_training. The evaluation protocol is such an override: `protocol=ran` (the RAN
paper's: train on train + val, report the last epoch on test; ranray.train.protocols) or `clean` (the
default: the best validation epoch, tested once). The keys the study sets itself (data.dir, epochs,
run.name, run.seed, run.storage_path) are refused there: use --data, --epochs, --variant-epochs.

Epochs: the size's (synthetic) or the job's (--data), unless --epochs. Equal epochs is the default
comparison; `epochs_x` variants multiply the epochs (whole_face_4x), and --variant-epochs NAME=N gives
a variant its epochs outright (and adds it to the study). whole_face_eqtime, the whole-face network
trained for RAN's training time, needs it: the table's notes suggest N from the measured faces/s.

Each run's model as its protocol reports it (model/best.pt: the best validation epoch under `clean`,
the last epoch under `ran`) is evaluated on the job's test split (ranray.evaluation): accuracy on
all faces, mean per-class accuracy, accuracy on clean faces (no flag) and on the occlusion, pose30 and
pose45 subsets; the row also has the training time, faces/s (the last epoch's training throughput of
all workers), the 1-min load and the epochs. For the region variants, each region's mean share of the
decision (mu * nu normalised over the regions) on all, clean, occluded and turned test faces
(bench/_occlusion_probe.py: measure_region_shares, printed per run), the largest of them (near 1: attention
collapsed onto one region), and whether attention follows occlusion (bench/_occlusion_probe.py: cover
each region of clean test faces, read its mu again).

Every finished run is appended to <workdir>/runs.jsonl with its identity (variant, seed, epochs, job,
data, overrides, and a digest of the config the variant resolves to, so that a row made before the
job file changed is not taken for the job of today): a rerun with the same --workdir skips the runs
already there, and --table-only prints the table of those that match the command line.

Tables: mean +- std over seeds, gaps to the whole-face baseline paired by seed (mean +- std of the
per-seed differences). Synthetic: clean / occluded / pose>30 accuracy, the mu change, and "meets"
(at least 5 points better on occluded faces with the gap above twice its std, no worse on clean
faces: the bar of issue 16); the demo job's baseline figures also go to ranray/commands/occlusion_study.json
for the demo summary. --data: test, mean class, occlusion, pose>30, pose>45 accuracy, the gaps on
occlusion and pose>30, the largest region share, train s, faces/s; the notes name the dataset
(manifest source, rows), job, protocol, epochs and seeds. Both are appended to bench/RESULTS.md.

    .venv/bin/python bench/occlusion.py --quick          # minutes: 2 seeds, 2 variants
    .venv/bin/python bench/occlusion.py                  # ~31 min on 2 quiet cores, nothing else running
    .venv/bin/python bench/occlusion.py --variants ran_crop_0.75,ran_landmark   # ~6 min a variant
    .venv/bin/python bench/occlusion.py --full                       # a bigger machine: all variants
    .venv/bin/python bench/occlusion.py --data data/ferplus --job jobs/ferplus_cpu.yaml \
        --variants whole_face,ran,no_rb_loss,no_relation --seeds 2 protocol=ran    # the paper's table, real FERPlus
    .venv/bin/python bench/occlusion.py --data data/ferplus --job jobs/ferplus_cpu.yaml \
        --variants whole_face,ran --variant-epochs whole_face_eqtime=N --seeds 2 protocol=ran  # + equal time
    .venv/bin/python bench/occlusion.py --data data/ferplus --job jobs/ferplus_cpu.yaml \
        --variants whole_face,ran --seeds 2 --table-only protocol=ran    # the table of the runs made
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import markdown_table, report  # noqa: E402

from ranray.config import ConfigError, TrainConfig, load_config  # noqa: E402
from ranray.data.prepare import PrepareSummary, prepare  # noqa: E402
from ranray.data.schema import SUBSET_FLAGS, SYNTH_MARKER  # noqa: E402
from ranray.data.synth import SynthOptions, SynthResult, synthesize  # noqa: E402

if TYPE_CHECKING:
    from ranray.train.launch import TrainingResult

REPO = Path(__file__).resolve().parents[1]
DEMO_JOB = REPO / "jobs" / "demo.yaml"
BASELINE_JSON = REPO / "ranray" / "commands" / "occlusion_study.json"  # what `ranray demo` prints beside its figures
DATA_SEED_OFFSET = 1000  # the study's faces are never the demo's (seed 0) or a test's
STUDY_OCCLUDERS = ("half_left", "half_right", "mask", "sunglasses")
BASELINE = "whole_face"
DEMO_VARIANT = "ran"  # the demo job as it is
EQTIME = "whole_face_eqtime"
BAR_POINTS = 5.0  # issue 16: RAN must beat the baseline on occluded faces by this much
# Keys every run's config gets from the study: an override of one would make the row lie about its run.
STUDY_KEYS = {"data.dir": "--data", "epochs": "--epochs or --variant-epochs", "run.name": "the study's run names",
              "run.seed": "--seeds", "run.storage_path": "--workdir"}


@dataclass(frozen=True)
class Size:
    train: int  # training faces
    val: int
    test: int
    epochs: int
    seeds: int
    variants: tuple[str, ...]


# Variant -> the job's overrides; "epochs_x" scales the study's epochs (the baseline at equal compute),
# "epochs_given": the epochs must come from --variant-epochs.
# The whole face is one crop whatever the job's region features: one config (and so one row) for the baseline.
WHOLE_FACE = ["model.variant=whole_face", "model.region_features=crops"]
VARIANTS: dict[str, dict] = {
    "whole_face": {"overrides": WHOLE_FACE},
    "ran": {"overrides": []},
    "ran_sigmoid": {"overrides": ["loss.rb_space=sigmoid"]},
    "no_rb_loss": {"overrides": ["model.variant=no_rb_loss"]},
    "whole_face_4x": {"overrides": WHOLE_FACE, "epochs_x": 4},
    EQTIME: {"overrides": WHOLE_FACE, "epochs_given": True},  # at RAN's training time
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
    "whole_face_no_erase": {"overrides": [*WHOLE_FACE, "data.augment.erase_prob=0"]},
    # Against the attention's collapse onto one region (docs/REAL_FACES.md)
    "ran_region_dropout": {"overrides": ["model.region_dropout=0.5"]},
    "ran_attention_dropout": {"overrides": ["model.attention_dropout=0.5"]},
    "ran_region_dropout_all": {"overrides": ["model.region_dropout=0.5", "model.region_dropout_whole_face=true"]},
    "ran_share_entropy": {"overrides": ["loss.share_entropy=0.1"]},
    # Region features from one backbone pass (model.region_features=pooled): at equal epochs, and given
    # the crops' training time (--variant-epochs ran_pooled_eqtime=N)
    "ran_crops": {"overrides": ["model.region_features=crops"]},  # the paper's regions, whatever the job says
    "ran_pooled": {"overrides": ["model.region_features=pooled"]},
    "ran_pooled_eqtime": {"overrides": ["model.region_features=pooled"], "epochs_given": True},
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
DEFAULT_OCCLUSION = (0.2, 0.5)  # --train-occlusion, --test-occlusion


# ---------------------------------------------------------------------------------------------
# The study: what every run is made of, and so what identifies its row in runs.jsonl
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    job: str  # relative to the repository when inside it, so a row reads the same on every checkout
    data: str  # the prepared set's absolute path, or the synthetic sets' description
    epochs: dict[str, int]  # variant -> its epochs, in the study's order
    overrides: tuple[str, ...]
    seeds: int

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(self.epochs)

    @property
    def job_path(self) -> Path:
        return REPO / self.job  # an absolute self.job stays as it is

    def identity(self, variant: str, seed: int) -> dict:
        return {"variant": variant, "seed": seed, "epochs": self.epochs[variant], "job": self.job,
                "data": self.data, "overrides": list(self.overrides), "config": self.config_digest(variant)}

    def config_digest(self, variant: str) -> str:
        """What the variant trains, whatever the job file says today: its resolved config less what the
        study sets per run. An edit of the job (a new default) thus never passes an old row off as new."""
        cfg = asdict(load_config(TrainConfig, self.job_path, [*VARIANTS[variant]["overrides"], *self.overrides]))
        cfg.pop("epochs")  # in the identity already, as the study's
        for section, key in (("run", "name"), ("run", "storage_path"), ("run", "seed"), ("data", "dir")):
            cfg[section].pop(key)
        return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]

    def run_name(self, variant: str, seed: int) -> str:
        # Unique per identity: Ray refuses to start a finished run's name again.
        digest = hashlib.sha1(json.dumps([self.job, self.data, self.overrides, self.config_digest(variant)]
                                         ).encode()).hexdigest()[:8]
        return f"{variant}-e{self.epochs[variant]}-s{seed}-{digest}"

    def config(self, variant: str, seed: int, data_dir: Path, workdir: Path) -> TrainConfig:
        return load_config(TrainConfig, self.job_path, [
            f"data.dir={data_dir}", f"run.storage_path={workdir / 'runs'}", f"run.name={self.run_name(variant, seed)}",
            f"run.seed={seed}", f"epochs={self.epochs[variant]}", *VARIANTS[variant]["overrides"], *self.overrides])


def synthetic_label(size: Size, train_occlusion: float, test_occlusion: float) -> str:
    return (f"synthetic: {size.train} train / {size.val} val / {size.test} test faces a seed, occluded "
            f"{train_occlusion:.0%} train, {test_occlusion:.0%} test")


def repo_label(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def check_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in STUDY_KEYS:
            raise SystemExit(f"bench/occlusion.py: '{item}': the study sets {key} itself; use {STUDY_KEYS[key]}")


def parse_variant_epochs(items: list[str]) -> dict[str, int]:
    """--variant-epochs whole_face_eqtime=5 (repeated, or comma separated) -> {variant: epochs}."""
    out = {}
    for item in (x for arg in items for x in arg.split(",") if x):
        name, _, n = item.partition("=")
        if name not in VARIANTS or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"bench/occlusion.py: --variant-epochs '{item}' is not NAME=N with N >= 1 and NAME one of "
                             f"{', '.join(VARIANTS)}")
        out[name] = int(n)
    return out


def variant_epochs(variants: tuple[str, ...], base: int, given: dict[str, int]) -> dict[str, int]:
    missing = [v for v in variants if VARIANTS[v].get("epochs_given") and v not in given]
    if missing:
        raise SystemExit(f"bench/occlusion.py: {', '.join(missing)} needs its epochs: --variant-epochs {missing[0]}=N "
                         f"(the whole-face network at RAN's training time; a study's notes suggest N)")
    return {v: given.get(v, base * VARIANTS[v].get("epochs_x", 1)) for v in variants}


def build_study(args: argparse.Namespace, size: Size) -> Study:
    check_overrides(args.overrides)
    job = Path(args.job).resolve()
    # Real data trains as its job says; the synthetic sizes were measured at their own epochs.
    base = args.epochs or (load_config(TrainConfig, job, args.overrides).epochs if args.data else size.epochs)
    data = str(Path(args.data).resolve()) if args.data else synthetic_label(size, args.train_occlusion,
                                                                               args.test_occlusion)
    return Study(job=repo_label(job), data=data, epochs=variant_epochs(size.variants, base, args.variant_epochs),
                 overrides=tuple(args.overrides), seeds=size.seeds)


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
    raw, out = workdir / f"data{opts.seed}" / "synth", workdir / f"data{opts.seed}" / "prepared"
    made_with = out.parent / "options.json"
    wanted = json.loads(json.dumps(asdict(opts)))
    if (out / "manifest.json").is_file() and made_with.is_file() and json.loads(made_with.read_text()) == wanted:
        return out
    print(prepare_synthetic(raw, out, opts, overwrite=True).line(), flush=True)
    made_with.write_text(json.dumps(wanted))
    return out


def prepare_synthetic(raw_dir: str | Path, out_dir: str | Path, options: SynthOptions | None = None,
                      **overrides: Any) -> PrepareSummary:
    """Synthesize a dataset into raw_dir (kept if already there with the same options), then prepare it.

    `overrides` are PrepareConfig fields (num_workers, overwrite, label_mode, ...).
    """
    opts = options or SynthOptions()
    raw = Path(raw_dir)
    info = raw / SYNTH_MARKER
    if info.is_file():
        kept = json.loads(info.read_text())
        if kept["options"] != json.loads(json.dumps(asdict(opts))):
            raise ConfigError(f"{raw} holds a synthetic dataset made with other options; use another folder")
        lists = {k: str(raw / f"{k}_list.txt") for k in SUBSET_FLAGS}
        result = SynthResult(root=raw, options=opts, counts=kept["counts"], subset_lists=lists)
    else:
        result = synthesize(raw, opts)
    return prepare(result.prepare_config(out_dir, **overrides))


def seed_data(args: argparse.Namespace, size: Size, workdir: Path) -> dict[int, Path]:
    if args.data:
        return {s: Path(args.data).resolve() for s in range(size.seeds)}
    return {s: prepare_seed(workdir, synth_options(size, s, args)) for s in range(size.seeds)}


def flagged_faces(data_dir: Path, split: str = "test") -> dict[str, int]:
    """Faces of the split per subset flag; refuse (SystemExit) a split without occluded faces: nothing to measure."""
    from ranray.data.schema import SUBSET_FLAGS, DatasetError
    from ranray.data.shards import build_index

    try:
        counts = {name: build_index(data_dir, split, name).num_rows for name in SUBSET_FLAGS}
    except DatasetError as exc:
        raise SystemExit(f"bench/occlusion.py: --data {data_dir} is not a prepared dataset with a '{split}' split: "
                         f"{exc}") from exc
    if counts["occlusion"] == 0:
        raise SystemExit(f"bench/occlusion.py: {data_dir} split '{split}' has no faces flagged 'occlusion' "
                         f"(subset_lists.occlusion at prepare time): there is no occluded accuracy to compare; "
                         f"prepare it with an occlusion list, or let the study synthesize its own faces")
    return counts


def dataset_line(data_dir: str) -> str:
    """The manifest's source and rows per split: what the table was measured on."""
    from ranray.data.schema import read_manifest

    manifest = read_manifest(data_dir)
    rows = ", ".join(f"{name} {info.get('rows', '?')}{split_flags(info)}" for name, info in manifest["splits"].items())
    return f"dataset {data_dir} (source {manifest.get('source', '?')}; rows {rows})"


def split_flags(info: dict) -> str:
    from ranray.data.schema import SUBSET_FLAGS

    flags = {k: n for k, n in info.get("flags", {}).items() if k in SUBSET_FLAGS and n}
    return f" ({', '.join(f'{k} {n}' for k, n in flags.items())})" if flags else ""


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


def train_and_measure(cfg: TrainConfig, attention_faces: int, runtime: str) -> dict:
    from ranray.models.ran import VARIANTS as MODEL_VARIANTS
    from ranray.train.launch import run_training

    started = time.perf_counter()
    result = run_training(cfg, runtime=runtime)
    row = {"train_s": time.perf_counter() - started, "faces_per_s": result.metrics.get("images_per_s"),
           "epochs_trained": result.metrics.get("epoch"), "steps": result.metrics.get("step"),
           "protocol": cfg.protocol, "run_dir": str(result.run_dir),
           "resumed": result.resumed}  # from an interrupted run's checkpoint: train_s is the rest only
    # model/best.pt is the protocol's model: the best validation epoch (clean), rewritten every epoch (ran).
    model = result.best_model or result.final_model
    row |= test_accuracies(model, cfg, result.run_dir)
    if MODEL_VARIANTS[cfg.model.variant].regions:
        row |= region_attention(model, cfg, result, attention_faces)
    row["load"] = os.getloadavg()[0]
    return row


def test_accuracies(model: Path, cfg: TrainConfig, run_dir: Path) -> dict:
    """Fractions in [0, 1] (None where the split has no face of a subset) under the study's names."""
    from ranray.evaluation import evaluate

    split = cfg.data.test_split
    m = evaluate(model, cfg.data.dir, split, out_dir=run_dir / f"eval_{split}", progress=False).metrics
    return {"all": m[f"{split}_accuracy"], "mean_class": m[f"{split}_mean_class_accuracy"],
            "clean": m.get(f"{split}_acc_clean"), "occluded": m.get(f"{split}_acc_occlusion"),
            "pose30": m.get(f"{split}_acc_pose30"), "pose45": m.get(f"{split}_acc_pose45")}


def region_attention(model: Path, cfg: TrainConfig, result: TrainingResult, attention_faces: int) -> dict:
    """Each region's mean share of the decision per subset (printed), and the covered region's mu change."""
    from _occlusion_probe import report_trained, shares_trained

    shares = shares_trained(model, cfg.data.dir, cfg.data.test_split)
    print(f"[occlusion] {cfg.run.name}: mean share of the decision per region (mu * nu normalised), "
          f"'{cfg.data.test_split}' split\n{markdown_table(*shares.table())}", flush=True)
    largest_region, largest_share = shares.largest()
    row = {"region_shares": shares.means(), "region_faces": shares.faces, "largest_region": largest_region,
           "largest_share": largest_share}
    if attention_faces > 0:
        shift, _ = report_trained(model, cfg.data.dir, result.run_dir / "attention_shift", cfg.data.test_split,
                                  max_faces=attention_faces, tracking_uri=result.tracking_uri,
                                  mlflow_run_id=result.mlflow_run_id)
        rows = shift.summary()
        row["mu_own"] = statistics.fmean(r["own_mean"] for r in rows)
        row["mu_own_minus_others"] = statistics.fmean(r["own_mean"] - r["others_mean"] for r in rows)
        row["mu_own_fell"] = statistics.fmean(r["own_fell"] for r in rows)
    return row


def run_one(study: Study, variant: str, seed: int, data_dir: Path, workdir: Path, attention_faces: int,
            runtime: str) -> dict:
    print(f"[occlusion] {variant} seed {seed}, {study.epochs[variant]} epochs: training ({time.strftime('%H:%M:%S')}, "
          f"load {os.getloadavg()[0]:.1f})", flush=True)
    row = train_and_measure(study.config(variant, seed, data_dir, workdir), attention_faces, runtime)
    row.update(study.identity(variant, seed))
    with (workdir / "runs.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"[occlusion] {variant} seed {seed}: test {row['all']:.3f}, mean class {row['mean_class']:.3f}, "
          f"occluded {row['occluded']:.3f}, {row['train_s']:.0f} s", flush=True)
    return row


# ---------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "n/a"
    return f"{statistics.fmean(vals):.{digits}f} +- {statistics.stdev(vals) if len(vals) > 1 else 0.0:.{digits}f}"


def paired_gap(runs: dict[tuple[str, int], dict], variant: str, key: str) -> list[float]:
    """Points by which the variant beats the baseline of the same seed (seeds where both have the figure)."""
    pairs = [(runs[(v, s)].get(key), runs[(BASELINE, s)].get(key)) for v, s in sorted(runs)
             if v == variant and (BASELINE, s) in runs]
    return [100 * (a - b) for a, b in pairs if a is not None and b is not None]


def rows_of(runs: dict[tuple[str, int], dict], variant: str) -> list[dict]:
    return [runs[(v, s)] for (v, s) in sorted(runs) if v == variant]


def meets_bar(occ_gap: list[float], clean_gap: list[float]) -> bool:
    if len(occ_gap) < 2:
        return False
    mean, std = statistics.fmean(occ_gap), statistics.stdev(occ_gap)
    return mean >= BAR_POINTS and mean > 2 * std and statistics.fmean(clean_gap) >= 0.0


def synthetic_table(runs: dict[tuple[str, int], dict], variants: tuple[str, ...]) -> tuple[list[str], list[list]]:
    headers = ["variant", "seeds", "clean %", "occluded %", "pose>30 %", "occluded gap vs whole face (pts)",
               "clean gap (pts)", "covered region's mu change", "own - others", "train s", "meets bar"]
    rows = []
    for v in variants:
        got = rows_of(runs, v)
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


REAL_HEADERS = ["variant", "seeds", "epochs", "test %", "mean class %", "occlusion %", "pose>30 %", "pose>45 %",
                "occlusion gap vs whole face (pts)", "pose>30 gap (pts)", "largest region share", "train s",
                "faces/s"]


def real_table(runs: dict[tuple[str, int], dict], study: Study) -> tuple[list[str], list[list]]:
    rows = []
    for v in study.variants:
        got = rows_of(runs, v)
        if not got:
            continue
        accuracies = [mean_std([r.get(k) for r in got]) for k in ("all", "mean_class", "occluded", "pose30", "pose45")]
        gaps = ["-" if v == BASELINE else mean_std(paired_gap(runs, v, k), 1.0) for k in ("occluded", "pose30")]
        rows.append([v, len(got), study.epochs[v], *accuracies, *gaps, largest_share_cell(got),
                     mean_of(got, "train_s"), mean_of(got, "faces_per_s")])
    return REAL_HEADERS, rows


def share_table(runs: dict[tuple[str, int], dict], study: Study) -> tuple[list[str], list[list]]:
    """Each region's share of the decision (mu * nu normalised), mean +- std over seeds, per variant
    with regions and per test subset: where the attention goes on clean, occluded and turned faces."""
    from _occlusion_probe import SHARE_SUBSETS

    regions: list[str] = []
    rows = []
    for v in study.variants:
        got = [r for r in rows_of(runs, v) if r.get("region_shares")]
        if not got:
            continue
        regions = regions or list(got[0]["region_shares"]["all"])
        for subset in SHARE_SUBSETS:
            rows.append([v, subset, *(mean_std([r["region_shares"][subset].get(k) for r in got], 1.0, 2)
                                      for k in regions)])
    return ["variant", "test faces", *regions], rows


def mean_of(got: list[dict], key: str) -> str:
    values = [r[key] for r in got if r.get(key) is not None]
    return f"{statistics.fmean(values):.0f}" if values else "-"


def largest_share_cell(got: list[dict]) -> str:
    """Mean +- std of the largest region's share, and the region that most seeds had largest."""
    shares = [r["largest_share"] for r in got if r.get("largest_share") is not None]
    if not shares:
        return "-"
    region = Counter(r["largest_region"] for r in got if r.get("largest_region")).most_common(1)[0][0]
    return f"{mean_std(shares, 1.0, 2)} ({region})"


def eqtime_hint(runs: dict[tuple[str, int], dict], study: Study) -> str:
    """Whole-face epochs that take RAN's training time, from the measured faces/s (the same faces an epoch)."""
    fps = {v: [r["faces_per_s"] for r in rows_of(runs, v) if r.get("faces_per_s")] for v in (BASELINE, DEMO_VARIANT)}
    if not all(fps.values()) or DEMO_VARIANT not in study.epochs:
        return ""
    n = study.epochs[DEMO_VARIANT] * statistics.fmean(fps[BASELINE]) / statistics.fmean(fps[DEMO_VARIANT])
    return (f"; the whole face trains at {statistics.fmean(fps[BASELINE]):.0f} faces/s, RAN at "
            f"{statistics.fmean(fps[DEMO_VARIANT]):.0f}: RAN's training time is about {max(1, round(n))} whole-face "
            f"epochs (--variant-epochs {EQTIME}={max(1, round(n))})")


def epochs_line(study: Study) -> str:
    values = set(study.epochs.values())
    return (f"{values.pop()} epochs" if len(values) == 1
            else "epochs " + ", ".join(f"{v} {e}" for v, e in study.epochs.items()))


def common_notes(runs: dict[tuple[str, int], dict], study: Study) -> str:
    loads = [r["load"] for r in runs.values()] or [os.getloadavg()[0]]
    overrides = f", overrides {' '.join(study.overrides)}" if study.overrides else ""
    return (f"job {study.job}{overrides}, {epochs_line(study)}, seeds 0..{study.seeds - 1}. {cpu_line()}; 1-min load "
            f"at the end of the runs {min(loads):.1f}..{max(loads):.1f}, at the table "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def synthetic_notes(args: argparse.Namespace, size: Size, study: Study, runs: dict) -> str:
    return (f"size {args.size}: {size.train} train / {size.val} val / {size.test} test faces per seed "
            f"(train occluded {args.train_occlusion:.0%}, test {args.test_occlusion:.0%}: "
            f"{', '.join(STUDY_OCCLUDERS)}); {protocol_line(study)}, mean +- std over seeds; "
            f"gaps paired by seed; mu change: a region's self-attention weight with that region covered minus "
            f"clean, mean over regions, on {args.attention_faces} clean test faces; bar: occluded gap >= "
            f"{BAR_POINTS:g} pts and > 2 std, clean gap >= 0; " + common_notes(runs, study))


def protocol_line(study: Study) -> str:
    cfg = study.config(BASELINE, 0, Path("."), Path("."))
    model = "the last epoch" if cfg.protocol == "ran" else "the best-val epoch"
    return f"protocol {cfg.protocol}: {model}'s model on the '{cfg.data.test_split}' split"


def real_notes(study: Study, runs: dict) -> str:
    return (f"{dataset_line(study.data)}; {protocol_line(study)}, mean +- std over seeds; mean class: the mean of "
            f"the per-class recalls; gaps paired by seed; "
            f"largest region share: the region with the largest mean share of the decision (mu * nu normalised) "
            f"over all test faces; faces/s: the last epoch's training throughput of all workers"
            f"{eqtime_hint(runs, study)}; " + common_notes(runs, study))


def baseline_summary(runs: dict[tuple[str, int], dict], size_name: str, size: Size, study: Study) -> dict:
    """What the demo summary prints beside RAN's occluded accuracy."""
    def stats(v: str) -> dict:
        got = rows_of(runs, v)
        return {k: round(statistics.fmean(r[k] for r in got), 4) for k in ("clean", "occluded")} | {"seeds": len(got)}

    region_features = load_config(TrainConfig, study.job_path, VARIANTS[DEMO_VARIANT]["overrides"]).model.region_features
    out = {"size": size_name, "train_faces": size.train, "epochs": study.epochs[BASELINE], "test_faces": size.test,
           "date": time.strftime("%Y-%m-%d"), "job": study.job, "region_features": region_features}
    for v in (BASELINE, DEMO_VARIANT):
        if rows_of(runs, v):
            out[v] = stats(v)
    return out


def write_table(args: argparse.Namespace, size: Size, study: Study, runs: dict[tuple[str, int], dict]) -> int:
    if args.data:
        (headers, rows), notes = real_table(runs, study), real_notes(study, runs)
        title = (f"Occlusion study on {Path(study.data).name}: RAN variants vs the whole-face baseline "
                 "(bench/occlusion.py)")
    else:
        (headers, rows), notes = synthetic_table(runs, study.variants), synthetic_notes(args, size, study, runs)
        title = "Occlusion study: RAN variants vs the whole-face baseline (bench/occlusion.py)"
    tables = [(title, headers, rows, notes)]
    if args.data and (shares := share_table(runs, study))[1]:
        tables.append((f"Region shares on {Path(study.data).name} (bench/occlusion.py)", *shares,
                       "each region's mean share of the decision (mu * nu normalised over the regions) on the test "
                       "faces of each subset, mean +- std over seeds; 1/K each would be an even spread. "
                       + common_notes(runs, study)))
    for table in tables:
        if args.no_results:
            print(markdown_table(*table[1:3]) + "\n\n" + table[3])
        else:
            report(*table)
    if args.no_results:
        return 0
    if not args.data and study.job_path == DEMO_JOB and not study.overrides:  # the demo's own configuration
        BASELINE_JSON.write_text(json.dumps(baseline_summary(runs, args.size, size, study), indent=1) + "\n")
    return 0


def cpu_line() -> str:
    from ranray.hardware import cpu_info

    return f"CPU flags: {cpu_info().describe()}"


# ---------------------------------------------------------------------------------------------
# runs.jsonl
# ---------------------------------------------------------------------------------------------


def load_runs(path: Path, study: Study) -> dict[tuple[str, int], dict]:
    """The rows of this study's runs, by (variant, seed); a later row of the same run wins. A row without
    the config digest (written before rows carried it) cannot say what it trained and belongs to no study."""
    if not path.is_file():
        return {}
    runs = {}
    for row in (json.loads(line) for line in path.read_text().splitlines() if line.strip()):
        key = (row["variant"], row["seed"])
        if row["variant"] in study.epochs and row["seed"] < study.seeds and all(
                row.get(k) == v for k, v in study.identity(*key).items()):
            runs[key] = row
    return runs


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="size", const="quick", help="minutes: a smoke run")
    size.add_argument("--full", action="store_const", dest="size", const="full", help="every variant, 2400 faces")
    p.set_defaults(size="default")
    p.add_argument("--job", default=str(DEMO_JOB), help="the job config every run starts from (default jobs/demo.yaml)")
    p.add_argument("--variants", help=f"comma list of {', '.join(VARIANTS)} (default: the size's)")
    p.add_argument("--variant-epochs", action="append", default=[], metavar="NAME=N",
                   help=f"a variant's own epochs, and the variant added to the study (e.g. {EQTIME}=5); repeatable")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the size's)")
    p.add_argument("--epochs", type=int, help="epochs of every variant (default: the size's; with --data the job's)")
    p.add_argument("--train-occlusion", type=float, default=DEFAULT_OCCLUSION[0],
                   help="occluded share of train/val faces")
    p.add_argument("--test-occlusion", type=float, default=DEFAULT_OCCLUSION[1], help="occluded share of test faces")
    p.add_argument("--attention-faces", type=int, default=96, help="clean test faces covered region by region")
    p.add_argument("--data", help="a prepared dataset with subset flags for every seed instead of synthetic faces")
    p.add_argument("--workdir", default="runs/occlusion", help="data, runs and runs.jsonl (default runs/occlusion)")
    p.add_argument("--runtime", choices=("ray", "local"), default="ray",
                   help="where each run trains: Ray Train (default) or this process (ranray train --local)")
    p.add_argument("--no-results", action="store_true", help="print the table only (no RESULTS.md, no json)")
    p.add_argument("--table-only", action="store_true",
                   help="no training: the table of this command line's runs already in <workdir>/runs.jsonl")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides of every run's config, after the variant's (e.g. protocol=ran, max_steps=2)")
    args = p.parse_intermixed_args(argv)  # KEY=VALUE may come before, between or after the options
    args.variant_epochs = parse_variant_epochs(args.variant_epochs)
    return args


def resolve_size(args: argparse.Namespace) -> Size:
    size = SIZES[args.size]
    variants = tuple(args.variants.split(",")) if args.variants else size.variants
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench/occlusion.py: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    variants += tuple(v for v in args.variant_epochs if v not in variants)
    if BASELINE not in variants:
        variants = (BASELINE, *variants)  # every gap is measured against it
    return replace(size, variants=variants, seeds=args.seeds or size.seeds, epochs=args.epochs or size.epochs)


def main(argv: list[str] | None = None) -> int:
    from ranray.ray_runtime import ensure_ray

    args = parse_args(argv)
    size = resolve_size(args)
    study = build_study(args, size)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    runs = load_runs(workdir / "runs.jsonl", study)
    if args.table_only:
        return write_table(args, size, study, runs)
    test_split = study.config(BASELINE, 0, workdir, workdir).data.test_split
    for v in study.variants:  # every config is checked before any data is made
        study.config(v, 0, workdir, workdir)
    data = seed_data(args, size, workdir)  # synthetic sets are prepared on Ray (ranray.data.prepare starts it)
    flagged = {d: flagged_faces(d, test_split) for d in sorted(set(data.values()))}  # refused before any training
    print(f"flagged '{test_split}' faces: " + "; ".join(f"{d}: {c}" for d, c in flagged.items()), flush=True)
    ensure_ray()
    for s in range(size.seeds):
        for v in study.variants:
            if (v, s) not in runs:
                runs[(v, s)] = run_one(study, v, s, data[s], workdir, args.attention_faces, args.runtime)
    return write_table(args, size, study, runs)


if __name__ == "__main__":
    sys.exit(main())
