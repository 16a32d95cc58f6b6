"""Ray Tune search over the RB margin and the learning rate (ASHA, Ray Train V2 pattern).

Shape of a search (Ray 2.60, Train V2):
    driver (this process)        Tuner: random search + ASHA; MLflow parent run; ends child runs
      trial (function, 0.01 CPU) opens the trial's MLflow child run and makes a TuneReportCallback
        fit task (0 CPU)         builds the TorchTrainer for the fine-tuning loop
                                 (ray_train.build_trainer, run name derived from the trial id) and fits it
          Train workers          finetune.train_func_per_worker: one report per epoch, which the
                                 callback hands to Tune (ASHA reads val_accuracy and epoch)

Everything that can be wrong in a config is checked by `plan_search` before Ray is touched. The
trial's TorchTrainer owns the real resources (Tune only sees the trial function's sliver), so the
number of concurrent trials is derived here from the cluster and the per-trial need.

Layout under <storage_path>/<name>/: Tune's experiment (experiment_state, trial_<id>/ result files),
train/<name>-<trial id>/ (each trial's training run: checkpoints, model/best.pt, plots), and
summary/ (trials.csv, best_config.yaml, accuracy_vs_params.png, the MLflow store by default).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from ranray.config import (ConfigError, SearchSpaceConfig, TrackingConfig, TrainConfig, TuneConfig, flatten,
                           from_dict, load_config, save_config, set_dotted, to_dict)
from ranray.ray_runtime import ensure_ray
from ranray.run_dir import RunDir
from ranray.tracking import Tracker
from ranray.tracking_access import check_store
from ranray.train.jobs import run_dir_for
from ranray.train.launch import preflight
from ranray.train.ray_train import build_trainer, fit_or_explain

log = logging.getLogger("ranray.tune")

# The trial function only waits on its TorchTrainer. Tune asks 1 CPU per trial by default, which on a
# small machine leaves the trainers' workers waiting for CPUs for ever; 0 is refused, so a sliver.
DRIVER_CPU = 0.01

# Trial statuses in the table and in MLflow (tag `trial_status` of the child run).
FINISHED, STOPPED_EARLY, FAILED, INTERRUPTED = "finished", "stopped_early", "failed", "interrupted"
MLFLOW_STATUS = {FINISHED: "FINISHED", STOPPED_EARLY: "KILLED", FAILED: "FAILED"}


# ---------------------------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Knob:
    """One searched hyperparameter: where it lands in a TrainConfig and how Tune samples it."""

    train_key: str  # dotted TrainConfig key
    domain: Callable[[SearchSpaceConfig], Any]  # a Tune domain, a constant, or None: not searched
    values: Callable[[SearchSpaceConfig], Sequence[Any]]  # what to validate before Ray starts
    minimum: float | None = None  # a bound TrainConfig.validate does not check itself


def _range(sampler: Callable[[float, float], Any], low: float, high: float) -> Any:
    # Ray refuses an empty interval; a degenerate range is a fixed value.
    return low if low == high else sampler(low, high)


def _choice(values: Sequence[Any]) -> Any:
    if not values:
        return None
    return values[0] if len(values) == 1 else tune.choice(list(values))


KNOBS: dict[str, Knob] = {
    "margin": Knob("loss.rb_margin", lambda s: _range(tune.uniform, s.margin_min, s.margin_max),
                   lambda s: (s.margin_min, s.margin_max), minimum=0.0),
    "lr": Knob("optim.lr", lambda s: _range(tune.loguniform, s.lr_min, s.lr_max),
               lambda s: (s.lr_min, s.lr_max)),
    "weight_decay": Knob("optim.weight_decay", lambda s: _choice(s.weight_decay),
                         lambda s: s.weight_decay, minimum=0.0),
    "batch_size": Knob("batch_size", lambda s: _choice(s.batch_size), lambda s: s.batch_size, minimum=1),
    "region_mode": Knob("model.region_mode", lambda s: _choice(s.region_mode), lambda s: s.region_mode),
}


def param_space(space: SearchSpaceConfig) -> dict[str, Any]:
    """Tune's param space: one entry per searched knob (a knob left empty keeps the base value)."""
    domains = {name: knob.domain(space) for name, knob in KNOBS.items()}
    return {name: domain for name, domain in domains.items() if domain is not None}


def apply_params(base: TrainConfig, params: dict[str, Any], extra: dict[str, Any] | None = None) -> TrainConfig:
    """`base` with the searched values and `extra` (dotted TrainConfig keys) set, validated."""
    raw = to_dict(base)
    for name, value in params.items():
        set_dotted(raw, KNOBS[name].train_key, _plain(value))
    for key, value in (extra or {}).items():
        set_dotted(raw, key, value)
    cfg = from_dict(TrainConfig, raw)
    cfg.validate()
    return cfg


def _plain(value: Any) -> Any:
    # Tune samples numpy scalars; configs, YAML and MLflow want Python ones.
    return value.item() if hasattr(value, "item") else value


def check_space(space: SearchSpaceConfig, base: TrainConfig) -> None:
    """Every value the space can produce must make a valid TrainConfig; ConfigError names the key."""
    for name, knob in KNOBS.items():
        for value in knob.values(space):
            if knob.minimum is not None and value < knob.minimum:
                raise ConfigError(f"config key 'space.{name}' has {value!r}, below the minimum {knob.minimum}")
            try:
                apply_params(base, {name: value})
            except ConfigError as err:
                raise ConfigError(f"config key 'space.{name}' value {value!r} is invalid: {err}") from None


# ---------------------------------------------------------------------------------------------
# Plan: everything checked before Ray starts
# ---------------------------------------------------------------------------------------------


@dataclass
class SearchPlan:
    cfg: TuneConfig
    base: TrainConfig  # the base training config with base_overrides and absolute paths
    name: str
    storage_path: str  # absolute; Tune's experiment is storage_path/name
    tracking: TrackingConfig  # uri resolved, so the driver, trials and workers share one store
    space: dict[str, Any]

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage_path) / self.name

    @property
    def train_storage(self) -> str:
        """Where the trials' TorchTrainers keep their runs and checkpoints."""
        return str(self.experiment_dir / "train")

    @property
    def output_dir(self) -> Path:
        """The search's own outputs: trial table, best config, plot, MLflow store."""
        return self.experiment_dir / "summary"


def plan_search(config_path: str | Path | None, overrides: Sequence[str] = ()) -> SearchPlan:
    """Load and check a tune config, its base training config, its space and its data; no Ray."""
    cfg = load_config(TuneConfig, config_path, list(overrides))
    try:
        base = _absolute_paths(load_config(TrainConfig, cfg.base_config, cfg.base_overrides))
    except ConfigError as err:
        raise ConfigError(f"base_config {cfg.base_config}: {err}") from None
    if base.protocol != "clean":
        # A search picks trials by their validation score: under `ran` that score is the test split's.
        raise ConfigError(f"base_config {cfg.base_config}: config key 'protocol' is {base.protocol!r}; a search "
                          "selects on the val split, which only protocol 'clean' keeps apart from test")
    check_space(cfg.space, base)
    name = cfg.name or (Path(config_path).stem if config_path else "tune")
    storage = _absolute(cfg.storage_path)
    output_dir = Path(storage) / name / "summary"
    tracking = dataclasses.replace(cfg.tracking, uri=check_store(cfg.tracking, output_dir))
    plan = SearchPlan(cfg=cfg, base=base, name=name, storage_path=storage, tracking=tracking,
                      space=param_space(cfg.space))
    try:
        preflight(trial_config(plan, {}, "preflight"))  # data dir, splits, classes, model, init weights
    except ConfigError as err:
        raise ConfigError(f"base_config {cfg.base_config}: {err}") from None
    return plan


def _absolute(path: str) -> str:
    # Train workers chdir into their run directory, so relative paths would resolve elsewhere.
    return path if not path or "://" in path else str(Path(path).expanduser().resolve())


def _absolute_paths(base: TrainConfig) -> TrainConfig:
    return dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, dir=_absolute(base.data.dir)),
        model=dataclasses.replace(base.model, init_backbone=_absolute(base.model.init_backbone)))


# ---------------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------------


def trial_demand(cfg: TuneConfig) -> dict[str, float]:
    """What one trial holds at once: its workers plus the trial function's sliver."""
    return {"CPU": cfg.max_workers_per_trial * cfg.cpus_per_worker + DRIVER_CPU,
            "GPU": cfg.max_workers_per_trial * cfg.gpus_per_worker}


def max_concurrent(cfg: TuneConfig, cluster: dict[str, float]) -> int:
    """How many trials fit at once, so that no trial waits on another's placement group.

    Tune sees only the trial functions' slivers, not the TorchTrainers' workers; without this cap
    it starts more trials than fit, and their trainers wait on each other for ever.
    """
    if cfg.max_concurrent_trials > 0:
        return cfg.max_concurrent_trials
    need = {res: amount for res, amount in trial_demand(cfg).items() if amount > 0}
    fits = min(math.floor(cluster.get(res, 0.0) / amount + 1e-9) for res, amount in need.items())
    if fits < 1:
        have = {res: cluster.get(res, 0.0) for res in need}
        raise ConfigError(
            f"one trial needs {need} but the cluster has {have}: lower workers_per_trial / cpus_per_worker / "
            f"gpus_per_worker, or set max_concurrent_trials to wait for an autoscaler")
    return min(fits, cfg.num_samples)


def train_scaling(cfg: TuneConfig, base: TrainConfig) -> dict[str, Any]:
    """The per-trial resources as TrainConfig keys."""
    use_gpu = cfg.gpus_per_worker > 0
    return {"scaling.num_workers": cfg.workers_per_trial, "scaling.cpus_per_worker": cfg.cpus_per_worker,
            "scaling.use_gpu": use_gpu,
            "scaling.gpus_per_worker": cfg.gpus_per_worker if use_gpu else base.scaling.gpus_per_worker}


# ---------------------------------------------------------------------------------------------
# The trial
# ---------------------------------------------------------------------------------------------


def trial_run_name(search: str, trial_id: str) -> str:
    """The TorchTrainer's run name: deterministic, so a restored trial resumes its own checkpoints."""
    return f"{search}-{trial_id}"


def trial_config(plan: SearchPlan, params: dict[str, Any], trial_id: str) -> TrainConfig:
    extra = {"run.name": trial_run_name(plan.name, trial_id), "run.storage_path": plan.train_storage,
             "epochs": plan.cfg.max_epochs, "tracking.uri": plan.tracking.uri,
             "tracking.experiment": plan.tracking.experiment,
             "tracking.credentials_file": plan.tracking.credentials_file, **train_scaling(plan.cfg, plan.base)}
    return apply_params(plan.base, params, extra)


def trial_run_dir(plan: SearchPlan, trial_id: str) -> Path:
    """The trial's training run directory (checkpoints, model/, plots/, its MLflow run record)."""
    return run_dir_for(plan.train_storage, trial_run_name(plan.name, trial_id))


def open_trial_run(plan: SearchPlan, trial_id: str, params: dict[str, Any], parent_run_id: str,
                   extra_params: dict[str, Any] | None = None) -> Tracker:
    """The trial's MLflow child run: created on first use, reopened after (its run dir records the id)."""
    tracker = Tracker(plan.tracking, trial_run_dir(plan, trial_id))
    tracker.start(trial_run_name(plan.name, trial_id),
                  params={**(extra_params or {}), **{k: _plain(v) for k, v in params.items()}},
                  tags={"job": "tune_trial", "trial_id": trial_id, "search": plan.name},
                  parent_run_id=parent_run_id, resume=True)
    return tracker


def run_trial(params: dict[str, Any], plan: SearchPlan, parent_run_id: str) -> None:
    """Tune's function trainable: one TorchTrainer run of the fine-tuning loop per trial."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(plan, params, trial_id)
    run = open_trial_run(plan, trial_id, params, parent_run_id, extra_params=flatten(cfg))
    # TuneReportCallback (made here, in the Tune session) hands rank 0's per-epoch report
    # (val_accuracy, epoch, checkpoint path) to Tune, where ASHA reads it; rank 0 logs its metrics
    # into the child run, which the driver ends.
    #
    # The trainer runs in a task that names this cluster in RAY_ADDRESS, which its controller and
    # the controller's placement-group cleaner inherit. The cleaner frees the workers of a trial
    # ASHA kills; it finds the cluster's state API by RAY_ADDRESS, else by looking for the one Ray
    # on the machine, and with a second local Ray running it gives up: the stopped trial's CPUs
    # stay reserved and later trials wait for them for ever.
    env = {"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}}
    fit = _fit_trial.options(runtime_env=env).remote(cfg, TuneReportCallback(), run.run_id)
    ray.get(fit)


@ray.remote(num_cpus=0, max_retries=0)  # owned by the trial: killed with it when ASHA stops the trial
def _fit_trial(cfg: TrainConfig, report: Any, run_id: str | None) -> None:
    run_dir = run_dir_for(cfg.run.storage_path, cfg.run.name)
    with fit_or_explain(f"trial {cfg.run.name}", run_dir, cfg.checkpoint.max_failures):
        build_trainer(cfg, run_name=cfg.run.name, callbacks=[report], tracking_run_id=run_id).fit()


# ---------------------------------------------------------------------------------------------
# Driver-side callbacks
# ---------------------------------------------------------------------------------------------


def trial_status(tune_status: str, epochs_run: int, max_epochs: int) -> str:
    """finished / stopped_early / failed / interrupted, from Tune's status and the epochs run."""
    if tune_status == "ERROR":
        return FAILED
    if tune_status == "TERMINATED":
        return FINISHED if epochs_run >= max_epochs else STOPPED_EARLY
    return INTERRUPTED  # PENDING / RUNNING / PAUSED when the search stopped: a resume continues it


class TrialStatus(tune.Callback):
    """Ends each trial's MLflow child run with its final status; a finished trial's best model is
    logged into it as an MLflow model here (as ranray.train.launch does for a run: no worker
    imports MLflow's pyfunc, and Tune may end a finished trial's function before it returns).

    Only the driver knows it: a trial that ASHA stops is killed mid-run, and Tune marks finished and
    stopped trials alike TERMINATED (the epochs run tell them apart).
    """

    def __init__(self, plan: SearchPlan, parent_run_id: str):
        self.plan = plan
        self.parent_run_id = parent_run_id

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epochs = int((trial.last_result or {}).get(self.plan.cfg.time_attr, 0))
        self._end(trial, trial_status("TERMINATED", epochs, self.plan.cfg.max_epochs))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, FAILED)

    def _end(self, trial: Any, status: str) -> None:
        try:
            run = open_trial_run(self.plan, trial.trial_id, trial.config, self.parent_run_id)
            best = RunDir(trial_run_dir(self.plan, trial.trial_id)).best_model
            if status == FINISHED and best.is_file():
                run.log_model(best, trial_config(self.plan, trial.config, trial.trial_id))
            run.set_tag("trial_status", status)
            run.end(MLFLOW_STATUS[status])
        except Exception:  # an exception here would end the whole search; tracking never does
            log.warning("could not record trial %s as %s in MLflow", trial.trial_id, status, exc_info=True)


# ---------------------------------------------------------------------------------------------
# The Tuner
# ---------------------------------------------------------------------------------------------

SEARCHERS: dict[str, Callable[[TuneConfig, int], Any]] = {
    # Tune's random search. Passed explicitly because that is what makes the concurrency cap hold:
    # Tune ignores TuneConfig.max_concurrent_trials when it is given a search generator.
    "random": lambda cfg, concurrent: BasicVariantGenerator(max_concurrent=concurrent, random_state=cfg.seed),
}


def scheduler(cfg: TuneConfig) -> Any:
    if not cfg.use_asha:
        return FIFOScheduler()
    return ASHAScheduler(time_attr=cfg.time_attr, max_t=cfg.max_epochs, grace_period=cfg.grace_period,
                         reduction_factor=cfg.reduction_factor)


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def trainable(plan: SearchPlan, parent_run_id: str) -> Any:
    fn = tune.with_parameters(run_trial, plan=plan, parent_run_id=parent_run_id)
    return tune.with_resources(fn, {"CPU": DRIVER_CPU})


def build_tuner(plan: SearchPlan, parent_run_id: str, concurrent: int, callbacks: Sequence[Any] = ()) -> tune.Tuner:
    cfg = plan.cfg
    return tune.Tuner(
        trainable(plan, parent_run_id),
        param_space=plan.space,
        tune_config=tune.TuneConfig(
            metric=cfg.metric, mode=cfg.mode, num_samples=cfg.num_samples, scheduler=scheduler(cfg),
            search_alg=SEARCHERS[cfg.searcher](cfg, concurrent), trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=plan.name, storage_path=plan.storage_path,
            callbacks=[TrialStatus(plan, parent_run_id), *callbacks],
            failure_config=tune.FailureConfig(max_failures=0)))


def open_tuner(plan: SearchPlan, parent_run_id: str, concurrent: int,
               callbacks: Sequence[Any] = ()) -> tuple[tune.Tuner, bool]:
    """(Tuner, restored): the search's experiment restored when it exists, else a new one.

    A restored search keeps what it started with (Tune restores its pickled space, scheduler,
    searcher and callbacks); only the trainable is given again. Finished trials are kept, trials
    that were running start again and their trainers resume from their last checkpoints.
    """
    path = str(plan.experiment_dir)
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable(plan, parent_run_id)), True
    return build_tuner(plan, parent_run_id, concurrent, callbacks), False


# ---------------------------------------------------------------------------------------------
# Running a search
# ---------------------------------------------------------------------------------------------


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    best_metric: float  # nan when the trial reported nothing
    epochs_run: int
    status: str
    checkpoint: str  # the Ray checkpoint reported with the best metric, else the newest kept ("" if none)
    best_model: str  # the trial's model/best.pt, exported by the loop at its best epoch ("" if none)
    error: str = ""  # why a failed trial failed, one line


@dataclass
class SearchResult:
    rows: list[TrialRow]
    best: TrialRow | None
    table_csv: Path
    best_config: Path | None
    plot: Path | None
    parent_run_id: str
    tracking_uri: str
    restored: bool
    num_samples: int

    @property
    def interrupted(self) -> bool:
        """Trials left unfinished, or not yet sampled: re-running the same command resumes."""
        return len(self.rows) < self.num_samples or any(row.status == INTERRUPTED for row in self.rows)


def run_search(plan: SearchPlan, callbacks: Sequence[Any] = ()) -> SearchResult:
    """Run (or resume) the search, then write and log its summary.

    callbacks: more Tune callbacks for a new search (a restored one keeps those it started with).
    """
    ensure_ray()
    concurrent = max_concurrent(plan.cfg, ray.cluster_resources())
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    config_file = record_config(plan)
    with Tracker(plan.tracking, plan.output_dir) as parent:  # FAILED if the search raises
        parent.start(plan.name, params=flatten(plan.cfg), tags={"job": "tune"}, resume=True)
        parent.log_artifact(config_file)
        tuner, restored = open_tuner(plan, parent.run_id, concurrent, callbacks)
        tuner.fit()
        result = summarize(plan, parent, restored)
        if result.interrupted:
            parent.end("KILLED")  # the resume reopens it
    return result


def record_config(plan: SearchPlan) -> Path:
    """Save the search's config on its first run; on a resume, warn about settings that changed.

    A restored search runs with the space, scheduler and searcher it started with (Tune restores
    them), so changes made for the resume are named rather than silently ignored.
    """
    path = plan.output_dir / "tune_config.yaml"
    if not path.exists():
        return save_config(plan.cfg, path)
    old = flatten(yaml.safe_load(path.read_text()) or {})
    changed = sorted(k for k, v in flatten(plan.cfg).items() if old.get(k, v) != v)
    if changed:
        log.warning("search %s resumes with the settings it started with; changed keys not applied: %s",
                    plan.name, ", ".join(changed))
    return path


# ---------------------------------------------------------------------------------------------
# Summary: trial table, best config, plot
# ---------------------------------------------------------------------------------------------


def trial_row(trial: Any, df: Any, plan: SearchPlan) -> TrialRow:
    """One trial's line of the table, from Tune's record of it and its reported results."""
    cfg = plan.cfg
    metric = df[cfg.metric] if cfg.metric in df.columns else None
    scored = metric is not None and bool(metric.notna().any())
    best_at = (metric.idxmax() if cfg.mode == "max" else metric.idxmin()) if scored else None
    clock = df[cfg.time_attr] if cfg.time_attr in df.columns else None
    epochs = int(clock.max()) if clock is not None and clock.notna().any() else 0
    best_model = RunDir(trial_run_dir(plan, trial.trial_id)).best_model
    return TrialRow(trial_id=trial.trial_id, params={k: _plain(v) for k, v in trial.config.items()},
                    best_metric=float(metric[best_at]) if scored else math.nan, epochs_run=epochs,
                    status=trial_status(trial.status, epochs, cfg.max_epochs),
                    checkpoint=_checkpoint_at(df, best_at), best_model=str(best_model) if best_model.exists() else "",
                    error=trial_error(trial))


def trial_error(trial: Any) -> str:
    """The last line of a failed trial's error: for a dead worker, RunFailed's one line."""
    try:
        error = trial.get_pickled_error()
    except Exception:  # no error recorded, or one that does not unpickle here
        return ""
    if error is None:
        return ""
    lines = str(getattr(error, "cause", None) or error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def _checkpoint_at(df: Any, best_at: Any) -> str:
    """The best row's checkpoint, else the newest that still exists (num_to_keep prunes old ones)."""
    if best_at is None or CHECKPOINT_PATH_KEY not in df.columns:
        return ""
    paths = df[CHECKPOINT_PATH_KEY]
    for path in [paths[best_at], *paths.iloc[::-1]]:
        if isinstance(path, str) and path and ("://" in path or Path(path).exists()):
            return path
    return ""


def best_row(rows: Sequence[TrialRow], mode: str) -> TrialRow | None:
    scored = [r for r in rows if not math.isnan(r.best_metric)]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.best_metric)


def table_columns(plan: SearchPlan) -> list[str]:
    return ["trial_id", *plan.space, f"best_{plan.cfg.metric}", "epochs_run", "status", "checkpoint", "best_model"]


def table_values(row: TrialRow, plan: SearchPlan) -> list[Any]:
    return [row.trial_id, *(row.params.get(k, "") for k in plan.space), row.best_metric, row.epochs_run,
            row.status, row.checkpoint, row.best_model]


def write_table(rows: Sequence[TrialRow], plan: SearchPlan, path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(table_columns(plan))
        writer.writerows(table_values(row, plan) for row in rows)
    return path


def format_table(rows: Sequence[TrialRow], plan: SearchPlan) -> str:
    """The trial table as aligned text (paths left out: they are in the CSV)."""
    keep = len(table_columns(plan)) - 2
    headers = table_columns(plan)[:keep]
    lines = [[_fmt(v) for v in table_values(row, plan)[:keep]] for row in rows]
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(headers)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in [headers, *lines])


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


STATUS_COLORS = {FINISHED: "tab:green", STOPPED_EARLY: "tab:orange", FAILED: "tab:red", INTERRUPTED: "tab:gray"}


def plot_trials(rows: Sequence[TrialRow], plan: SearchPlan, path: Path) -> Path:
    """Best metric against margin and against lr (log axis), one colour per trial status."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)  # Agg, never pyplot: no global backend, no display
    for ax, (param, log_x) in zip(fig.subplots(1, 2), (("margin", False), ("lr", True))):
        for status, color in STATUS_COLORS.items():
            pts = [(r.params.get(param, _base_value(plan, param)), r.best_metric) for r in rows
                   if r.status == status and not math.isnan(r.best_metric)]
            if pts:
                ax.scatter(*zip(*pts), c=color, label=status, edgecolors="black", linewidths=0.5)
        ax.set_xscale("log" if log_x else "linear")
        ax.set_xlabel(f"{param} ({KNOBS[param].train_key})")
        ax.set_ylabel(f"best {plan.cfg.metric}")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(loc="best", fontsize="small")
    fig.suptitle(f"{plan.name}: {len(rows)} trials")
    fig.savefig(path, format="png", dpi=100)
    return path


def _base_value(plan: SearchPlan, param: str) -> Any:
    value: Any = plan.base
    for part in KNOBS[param].train_key.split("."):
        value = getattr(value, part)
    return value


def write_best_config(plan: SearchPlan, best: TrialRow, path: Path) -> Path:
    """The base training config with the best trial's values, ready for `ranray train --config`.

    Epochs, schedule and resources stay the base config's: the search trains max_epochs on
    per-trial resources only to rank the values.
    """
    return save_config(apply_params(plan.base, best.params, {"run.name": f"{plan.name}-best"}), path)


def summarize(plan: SearchPlan, parent: Tracker, restored: bool) -> SearchResult:
    """Trial table (CSV), best config (YAML) and plot (PNG), logged to the parent run."""
    import pandas as pd

    analysis = tune.ExperimentAnalysis(str(plan.experiment_dir))
    frames = analysis.trial_dataframes
    rows = sorted((trial_row(t, frames.get(t.trial_id, pd.DataFrame()), plan) for t in analysis.trials),
                  key=lambda r: r.trial_id)
    out = plan.output_dir
    best = best_row(rows, plan.cfg.mode)
    table = write_table(rows, plan, out / "trials.csv")
    best_config = write_best_config(plan, best, out / "best_config.yaml") if best else None
    plot = plot_trials(rows, plan, out / "accuracy_vs_params.png") if best else None
    for artifact in (table, best_config, plot):
        if artifact is not None:
            parent.log_artifact(artifact)
    parent.log_metrics({f"trials_{status}": sum(r.status == status for r in rows) for status in STATUS_COLORS})
    if best is not None:
        parent.log_metrics({f"best_{plan.cfg.metric}": best.best_metric})
        parent.set_tags({"best_trial_id": best.trial_id, "best_checkpoint": best.checkpoint,
                         "best_model": best.best_model, **{f"best.{k}": v for k, v in best.params.items()}})
    return SearchResult(rows=rows, best=best, table_csv=table, best_config=best_config, plot=plot,
                        parent_run_id=parent.run_id or "", tracking_uri=parent.tracking_uri, restored=restored,
                        num_samples=plan.cfg.num_samples)
