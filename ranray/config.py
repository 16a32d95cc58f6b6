"""Typed job configs: YAML in, validated, `key=value` overrides, saved beside every run.

Every job (prepare, train, pretrain, tune) has one dataclass tree here. Loading refuses unknown
keys and wrong types with a message naming the dotted key, before anything expensive starts.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml

from ranray.data.schema import SUBSETS

log = logging.getLogger(__name__)

T = TypeVar("T")

CLASS_NAMES: tuple[str, ...] = (
    "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
)


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted key."""


@dataclass(frozen=True)
class Choice:
    """A config key whose values are the keys of a registry ("module:NAME"), plus `extra` values
    that mean something before a registry is consulted (e.g. "auto"). The registry is the one list
    of choices; it is imported when a config is validated, so that this module stays light."""

    registry: str
    extra: tuple[str, ...] = ()

    def choices(self) -> list[str]:
        import importlib

        module, name = self.registry.split(":")
        return [*self.extra, *getattr(importlib.import_module(module), name)]


def one_of(registry: str, *extra: str) -> Any:
    """The annotation of a key chosen from `registry` (see Choice)."""
    return Annotated[str, Choice(registry, extra)]


# ---------------------------------------------------------------------------------------------
# Job configs
# ---------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = ""  # empty: derived from the job and a timestamp
    storage_path: str = "runs"  # local dir, NFS path or s3://... for multi-node
    seed: int = 0
    # Engine hooks every worker builds: "module:factory" import paths, each factory called without
    # arguments (ranray.train.engine.Hook; the module must be importable on the workers).
    hooks: list[str] = field(default_factory=list)
    # Training progress on rank 0 (ranray.train.progress): auto = a bar when the driver's stdout is a
    # terminal, else plain lines (`ray job submit`, a pipe, a file); bar, lines or off; on = bar.
    # YAML reads a bare off / on as false / true: they mean the same.
    progress: Literal["auto", "bar", "lines", "off", "on", False, True] = "auto"
    progress_every_s: float = 30.0  # lines: at most one every this many seconds

    def __post_init__(self) -> None:
        _check(self.progress_every_s > 0, "run.progress_every_s", "must be > 0")


@dataclass
class AugmentConfig:
    enabled: bool = True
    flip: bool = True
    rotate_deg: float = 10.0
    scale_min: float = 0.9
    scale_max: float = 1.1
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    blur_prob: float = 0.1
    erase_prob: float = 0.25
    erase_max_frac: float = 0.3


@dataclass
class DataConfig:
    dir: str = ""  # a prepared dataset: manifest.json + <split>/part-*.parquet
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    train_subset: Literal[SUBSETS] = "all"
    loader: one_of("ranray.data.loader:BACKENDS") = "dali"
    num_threads: int = 2
    # auto: NHWC where it is fast and safe (ranray.hardware: CUDA, CPUs off oneDNN's AVX-512 path)
    channels_last: Literal["auto", True, False] = "auto"
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    """The RAN, as ranray.models.ran.RegionAttentionNetwork takes it (the only model config)."""

    backbone: str = "iresnet50"
    region_mode: one_of("ranray.models.ran:REGION_MODES") = "fixed"
    num_regions: int = 6  # K, the whole face included
    crop_frac: float = 0.6  # side of a fixed / landmark / random region as a fraction of the face
    # How a region becomes features (ranray.models.ran.REGION_FEATURES): crops, the paper's (each box
    # resampled from the image and run through the whole backbone: K backbone passes a face), or pooled
    # (one backbone pass over the whole face, each box resampled from its last feature map, then the
    # backbone's head per region: about the whole-face network's cost)
    region_features: one_of("ranray.models.ran:REGION_FEATURES") = "crops"
    dropout: float = 0.0  # before the classifier
    # Dropout on the inputs of the two attention heads: the reference code's (0.5 there)
    attention_dropout: float = 0.0
    # Training only: each face drops each part region (not the whole face) from both poolings with
    # this probability, so no region can carry every decision (docs/REAL_FACES.md: the collapse)
    region_dropout: float = 0.0
    # ... the whole face too (a face that loses every region keeps one at random): no view is always there
    region_dropout_whole_face: bool = False
    num_classes: int = 8
    # The dataset's classes in label order (RAF-DB's 7, AffectNet's 7 or 8); empty: taken from the
    # prepared dataset's manifest before training, CLASS_NAMES[:num_classes] where there is none
    class_names: list[str] = field(default_factory=list)
    input_size: int = 112  # the backbone's input side; every region is resampled to it
    # The paper's ablations as models (ranray.models.ran.VARIANTS): ran, whole_face (one region, the
    # baseline), no_rb_loss, no_relation (self-attention only)
    variant: one_of("ranray.models.ran:VARIANTS") = "ran"
    init_backbone: str = ""  # a pretraining checkpoint or an insightface backbone.pth, loaded strictly


@dataclass
class LossConfig:
    """What fine-tuning minimises: expression loss (label mode) + region-biased loss (ranray.models.losses)."""

    label_mode: one_of("ranray.models.losses:LABEL_MODES") = "majority"
    # null: the official code's margin for the prepared dataset (ranray.models.losses.RB_MARGINS:
    # 0.1 FERPlus, 0.02 AffectNet and RAF-DB)
    rb_margin: float | None = None
    rb_space: one_of("ranray.models.losses:RB_SPACES") = "softmax"  # softmax: the official code; sigmoid: the paper's text
    # Weight of a penalty on the concentration of the decision on few regions (log K - entropy of the
    # mu * nu shares; ranray.models.losses.share_concentration). Not in the paper: 0 turns it off.
    share_entropy: float = 0.0


@dataclass
class OptimConfig:
    name: one_of("ranray.train.optim:OPTIMIZERS") = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    schedule: one_of("ranray.train.optim:SCHEDULES") = "step"
    milestones: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.8])  # fractions of epochs
    gamma: float = 0.1
    grad_clip: float = 5.0  # 0 disables clipping


@dataclass
class ScalingConfig:
    """Workers of a Ray Train job: a fixed count, or a range [min, max] for elastic training.

    A range (`[2, 8]` in YAML, `scaling.num_workers=2-8` on the command line) becomes Ray's
    ScalingConfig(num_workers=(min, max)): the group starts with what the cluster can give, up to
    max, and restarts smaller or larger from the newest checkpoint when workers go or come back
    (docs/ELASTIC.md). It is kept as an int when fixed and as [min, max] otherwise.
    """

    num_workers: int | list[int] | str = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used only with use_gpu

    def __post_init__(self) -> None:
        self.num_workers = parse_worker_range(self.num_workers)

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    def ray_num_workers(self) -> int | tuple[int, int]:
        """What ray.train.ScalingConfig(num_workers=...) takes: an int, or (min, max) when elastic."""
        return (self.min_workers, self.max_workers) if self.elastic else self.max_workers


def parse_worker_range(value: Any, key: str = "scaling.num_workers") -> int | list[int]:
    """4, [2, 8], "2-8" (or "4") -> 4, [2, 8], [2, 8]; [n, n] collapses to n."""
    text = value.strip() if isinstance(value, str) else None
    if text is not None:
        low, sep, high = text.partition("-")
        if not (low.strip().isdigit() and (not sep or high.strip().isdigit())):
            raise ConfigError(f"config key '{key}' must be a worker count or a range MIN-MAX, got {value!r}")
        value = [int(low), int(high)] if sep else int(low)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(type(v) is int for v in value):
            raise ConfigError(f"config key '{key}' as a range must be [min, max] of two ints, got {value!r}")
        low, high = value
        if not 1 <= low <= high:
            raise ConfigError(f"config key '{key}' range [{low}, {high}] needs 1 <= min <= max")
        return low if low == high else [low, high]
    if type(value) is not int:
        raise ConfigError(f"config key '{key}' must be an int or [min, max], got {type(value).__name__} {value!r}")
    if value < 1:
        raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
    return value


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # 0: once per epoch
    keep: int = 2
    max_failures: int = 0


@dataclass
class TrackingConfig:
    uri: str = ""  # empty: MLFLOW_TRACKING_URI, else a sqlite store under the run dir
    experiment: str = "ranray"
    register_model: str = ""  # Model Registry name for a fine-tuning run's best model; empty: logged, not registered
    # A server with authentication: the file (MLflow's credentials format) holding this job's user
    # and password, a path on the machines that run the job. Empty: MLFLOW_TRACKING_USERNAME /
    # _PASSWORD, else the file $RANRAY_MLFLOW_CREDENTIALS names, else ~/.mlflow/credentials.
    credentials_file: str = ""


@dataclass
class TrackingServerConfig:
    """The team's MLflow server (`ranray track server`, ranray.tracking_server)."""

    host: str = "0.0.0.0"
    port: int = 5000
    # PostgreSQL (postgresql://user@host:5432/db, password in ~/.pgpass) where the team has one;
    # empty: SQLite files in db_dir, which must be the node's own disk (refused on a network mount)
    backend_uri: str = ""
    db_dir: str = "/var/lib/ranray/mlflow"
    artifacts: str = "/mnt/shared/ranray/mlflow/artifacts"  # a shared folder, or s3://bucket/prefix
    # Copies of the SQLite databases, made while the server runs and restored by a server that starts
    # without them (a new head node). Empty: no backups.
    backup_dir: str = "/mnt/shared/ranray/mlflow/backup"
    backup_every_s: int = 300
    admin_user: str = "admin"
    admin_password_file: str = "~/.ranray/mlflow_admin_password"  # a secret: never a default password
    default_permission: one_of("ranray.tracking_server:PERMISSIONS") = "READ"  # what a user may do on others' experiments
    workers: int = 2
    # Seconds a checked user/password pair is trusted without hashing it again: MLflow checks the
    # hash (scrypt, ~85 ms on a 2-core machine) on every request otherwise. A changed password or a
    # deleted user reaches the other server workers after this long at most. 0: check every request.
    auth_cache_s: int = 60

    def validate(self) -> None:
        _check(1 <= self.port <= 65535, "port", "must be a TCP port (1-65535)")
        _check(self.backup_every_s >= 10, "backup_every_s", "must be >= 10 seconds")
        _check(self.workers >= 1, "workers", "must be >= 1")
        _check(self.auth_cache_s >= 0, "auth_cache_s", "must be >= 0 (0: no cache)")
        _check(bool(self.admin_user), "admin_user", "must name the admin user")
        _check(bool(self.admin_password_file), "admin_password_file", "must name the file holding the admin password")
        _check(bool(self.artifacts), "artifacts", "must be a shared folder or an s3:// URI")
        _check(bool(self.backend_uri or self.db_dir), "db_dir", "must be a folder on the node's own disk "
                                                                "(or set backend_uri)")


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # clean: train on data.train_split, select the best epoch on data.val_split, test it once on
    # data.test_split; ran: the RAN paper's, train on train + val, report the last epoch on test
    protocol: one_of("ranray.train.protocols:PROTOCOLS") = "clean"
    epochs: int = 60
    batch_size: int = 32  # per worker
    precision: one_of("ranray.train.optim:PRECISIONS", "auto") = "auto"  # auto: ranray.hardware.resolve_precision
    compile: bool = False
    max_steps: int = 0  # > 0: stop after this many steps (smoke runs, benchmarks); the LR schedule still spans `epochs`
    log_every_n_steps: int = 50  # the loss is read from the device (a sync) and logged at this cadence

    # Keys that moved, old -> new: job files and checkpoints written before keep loading.
    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "model.rb_margin": "loss.rb_margin",
        "data.label_mode": "loss.label_mode",
    }

    def validate(self) -> None:
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(self.batch_size > 0, "batch_size", "must be > 0")
        check_model(self.model)
        _check(self.loss.rb_margin is None or self.loss.rb_margin >= 0.0, "loss.rb_margin", "must be >= 0 (or null)")
        _check(self.loss.share_entropy >= 0.0, "loss.share_entropy", "must be >= 0 (0: off)")
        _check(self.optim.lr > 0.0, "optim.lr", "must be > 0")
        _check(all(0.0 < m < 1.0 for m in self.optim.milestones), "optim.milestones",
               "must be fractions of the epochs in (0, 1)")
        _check(self.scaling.min_workers >= 1, "scaling.num_workers", "must be >= 1")
        _check(self.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
        _check_loop(self)
        if self.precision == "fp16":
            _check(self.scaling.use_gpu, "precision", "fp16 needs a GPU (use bf16 on CPU)")


@dataclass
class PrepareConfig:
    source: one_of("ranray.data.sources:PLANNERS") = "ferplus"
    inputs: list[str] = field(default_factory=list)  # source files or folders, per reader
    out: str = ""
    label_mode: one_of("ranray.data.sources.ferplus_labels:LABEL_MODES") = "majority"
    # given: face crops, no detection; none: already-aligned 112x112 faces (insightface RecordIO,
    # aligned folders) pass through without dlib: size and channels checked, JPEG bytes kept.
    detector: one_of("ranray.data.align:DETECTORS", "none") = "given"
    resize: bool = False  # detector none: resize faces that are not 112x112 instead of rejecting them
    # given mode: a landmark fit that fails its plausibility check is aligned from the box and
    # flagged (True), or rejected as "landmark_implausible" (False) for users who want only fitted faces.
    align_fallback: bool = True
    # Where aligned faces sit in the 112x112 frame (ranray.data.align.TEMPLATES): insightface's
    # face-recognition frame, or fer2013 (FER2013's own tighter crop, so 48-pixel crops are not shrunk
    # into black borders). auto: fer2013 for FER2013's crops (the ferplus source, not synthetic),
    # insightface for every other (ranray.data.prepare.align_template).
    align_template: one_of("ranray.data.align:TEMPLATES", "auto") = "auto"
    subset_lists: dict[str, str] = field(default_factory=dict)  # flag name -> file of image names
    affectnet_classes: Literal[7, 8] = 8  # AffectNet's published class sets: 8, or 7 without contempt
    num_workers: int = 0  # 0: one actor per CPU Ray has
    worker_retries: int = 2  # a block whose actor died is retried on a fresh actor this many times
    rows_per_shard: int = 2048  # one shard per split per block of this many input rows (fewer for small inputs)
    # Each block gathers this many runs of rows from across the input, so that shards of an
    # identity-sorted source (RecordIO, identity folders) mix many identities in every row group.
    segments_per_shard: int = 16
    progress_every: int = 10  # a progress line every this many blocks
    resume: bool = True  # a killed run's committed blocks are kept and only the rest is prepared again
    jpeg_quality: int = 95
    overwrite: bool = False

    # Keys that no longer mean anything: a job file that sets one still loads, with a warning.
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "batch_size": "prepare runs whole blocks per task (rows_per_shard)",
    }

    def validate(self) -> None:
        _check(bool(self.out), "out", "is required")
        _check(bool(self.inputs), "inputs", "needs at least one path")
        _check(self.num_workers >= 0, "num_workers", "must be >= 0")
        _check(self.worker_retries >= 0, "worker_retries", "must be >= 0")
        _check(1 <= self.jpeg_quality <= 100, "jpeg_quality", "must be in 1..100")
        _check(self.rows_per_shard >= 1, "rows_per_shard", "must be >= 1")
        _check(self.segments_per_shard >= 1, "segments_per_shard", "must be >= 1")
        _check(self.progress_every >= 1, "progress_every", "must be >= 1")
        _check(not self.resize or self.detector == "none", "resize", "only applies to detector none")
        for flag in self.subset_lists:
            _check(flag in SUBSETS[1:], f"subset_lists.{flag}", f"must be one of {SUBSETS[1:]}")


@dataclass
class MarginConfig:
    """Combined margin softmax: s * (cos(m1*theta + m2) - m3)."""

    scale: float = 64.0
    m1: float = 1.0
    m2: float = 0.5  # ArcFace
    m3: float = 0.0  # CosFace uses m2=0, m3=0.4
    easy_margin: bool = False


@dataclass
class PartialFCConfig:
    sample_rate: float = 1.0  # fraction of negative classes sampled per step; 1 = full softmax
    embedding_size: int = 512


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: str = "iresnet50"
    num_classes: int = 0  # 0: from the dataset manifest
    margin: MarginConfig = field(default_factory=MarginConfig)
    partial_fc: PartialFCConfig = field(default_factory=PartialFCConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    verification_pairs: str = ""  # pairs file: key_a key_b same(0/1)
    epochs: int = 20
    batch_size: int = 128
    precision: one_of("ranray.train.optim:PRECISIONS", "auto") = "auto"  # auto: ranray.hardware.resolve_precision
    compile: bool = False
    max_steps: int = 0  # > 0: stop after this many steps (smoke runs, benchmarks); the LR schedule still spans `epochs`
    log_every_n_steps: int = 50  # the loss is read from the device (a sync) and logged at this cadence

    def validate(self) -> None:
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(0.0 < self.partial_fc.sample_rate <= 1.0, "partial_fc.sample_rate", "must be in (0, 1]")
        _check(self.num_classes >= 0, "num_classes", "must be >= 0")
        _check(self.margin.scale > 0, "margin.scale", "must be > 0")
        _check_loop(self)


@dataclass
class SearchSpaceConfig:
    margin_min: float = 0.0
    margin_max: float = 0.3
    lr_min: float = 1e-3
    lr_max: float = 0.3
    weight_decay: list[float] = field(default_factory=list)  # empty: keep the base value
    batch_size: list[int] = field(default_factory=list)
    region_mode: list[str] = field(default_factory=list)


@dataclass
class TuneConfig:
    name: str = ""
    storage_path: str = "runs"
    base_config: str = "jobs/ferplus_ran_r50.yaml"
    base_overrides: list[str] = field(default_factory=list)
    space: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)
    num_samples: int = 8
    searcher: one_of("ranray.tune:SEARCHERS") = "random"
    use_asha: bool = True
    grace_period: int = 2
    reduction_factor: int = 2
    max_epochs: int = 10
    # ASHA's clock; "epoch" (completed epochs, as the loop reports them) survives a resumed trial,
    # whose training_iteration restarts at 1.
    time_attr: Literal["epoch", "training_iteration"] = "epoch"
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    workers_per_trial: int | list[int] | str = 1  # a count, or a range MIN-MAX for elastic trials
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 0  # 0: derived from the cluster's resources
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        self.workers_per_trial = parse_worker_range(self.workers_per_trial, "workers_per_trial")

    @property
    def max_workers_per_trial(self) -> int:
        """What a trial may hold at its largest (an elastic trial's max)."""
        w = self.workers_per_trial
        return w if isinstance(w, int) else w[1]

    def validate(self) -> None:
        s = self.space
        _check(0.0 <= s.margin_min <= s.margin_max, "space.margin_min",
               f"needs 0 <= margin_min <= margin_max (got {s.margin_min}, {s.margin_max})")
        _check(0.0 < s.lr_min <= s.lr_max, "space.lr_min",
               f"needs 0 < lr_min <= lr_max (got {s.lr_min}, {s.lr_max})")
        _check(self.num_samples >= 1, "num_samples", "must be >= 1")
        _check(self.grace_period >= 1, "grace_period", "must be >= 1")
        _check(self.reduction_factor >= 2, "reduction_factor", "must be >= 2")
        _check(self.max_epochs >= self.grace_period, "max_epochs", "must be >= grace_period")


# ---------------------------------------------------------------------------------------------
# Loading, overriding, saving
# ---------------------------------------------------------------------------------------------


def class_names_of(m: ModelConfig) -> tuple[str, ...]:
    """The model's class names, index = logit."""
    return tuple(m.class_names) if m.class_names else CLASS_NAMES[: m.num_classes]


def check_model(m: ModelConfig) -> None:
    """The ranges of every model key; which K a region mode supports is the model's to say
    (ranray.models.ran.check_regions)."""
    _check(m.num_regions >= 2 or m.variant == "whole_face", "model.num_regions", "must be >= 2 (whole face + regions)")
    _check(0.0 < m.crop_frac <= 1.0, "model.crop_frac", "must be in (0, 1]")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    _check(0.0 <= m.attention_dropout < 1.0, "model.attention_dropout", "must be in [0, 1)")
    _check(0.0 <= m.region_dropout < 1.0, "model.region_dropout", "must be in [0, 1)")
    _check(m.num_classes >= 1, "model.num_classes", "must be >= 1")
    _check(not m.class_names or len(m.class_names) == m.num_classes, "model.class_names",
           f"has {len(m.class_names)} names for model.num_classes={m.num_classes}")
    _check(m.input_size >= 16 and m.input_size % 16 == 0, "model.input_size",
           f"must be a multiple of 16 (the iResNet's four stride-2 stages), e.g. 64 or 112; got {m.input_size}")


def _check_loop(cfg: TrainConfig | PretrainConfig) -> None:
    _check(cfg.max_steps >= 0, "max_steps", "must be >= 0 (0: no limit)")
    _check(cfg.log_every_n_steps >= 1, "log_every_n_steps", "must be >= 1")
    _check(all(h.count(":") == 1 for h in cfg.run.hooks), "run.hooks", "entries must read 'module:factory'")


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {why}")


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build `cls` from a YAML file (optional) and `key=value` overrides, then validate it."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        raw = loaded
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    cfg = from_dict(cls, raw)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    return key, yaml.safe_load(text) if text.strip() else ""


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type[T], raw: dict[str, Any], prefix: str = "") -> T:
    """Build a dataclass from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    raw = _renamed(cls, raw, prefix)
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known keys here: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in raw.items()}
    return cls(**kwargs)


def _renamed(cls: type, raw: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`raw` with the class's RENAMED_KEYS moved to their new place and its REMOVED_KEYS dropped
    (a warning each)."""
    renames = getattr(cls, "RENAMED_KEYS", {})
    removed = getattr(cls, "REMOVED_KEYS", {})
    if not any(_get_dotted(raw, old) is not _MISSING for old in (*renames, *removed)):
        return raw
    raw = copy.deepcopy(raw)
    for old, why in removed.items():
        if _pop_dotted(raw, old) is not _MISSING:
            log.warning("config key '%s%s' is no longer used (%s); leave it out", prefix, old, why)
    for old, new in renames.items():
        value = _pop_dotted(raw, old)
        if value is _MISSING:
            continue
        if _get_dotted(raw, new) is not _MISSING:
            raise ConfigError(f"config keys '{prefix}{old}' and '{prefix}{new}' are both set; "
                              f"'{prefix}{old}' is the old name of '{prefix}{new}', keep only that")
        log.warning("config key '%s%s' is now '%s%s'", prefix, old, prefix, new)
        set_dotted(raw, new, value)
    return raw


_MISSING = object()


def _get_dotted(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _pop_dotted(raw: dict[str, Any], key: str) -> Any:
    *sections, leaf = key.split(".")
    parent = _get_dotted(raw, ".".join(sections)) if sections else raw
    return parent.pop(leaf) if isinstance(parent, dict) and leaf in parent else _MISSING


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *marks = typing.get_args(tp)
        value = _coerce(base, value, key)
        for choice in (m for m in marks if isinstance(m, Choice)):
            if value not in choice.choices():
                raise ConfigError(f"config key '{key}' must be one of {choice.choices()}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        # Typed match: YAML's 1 must not pass for True, nor True for "true".
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__}")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return {_coerce(key_tp, k, key): _coerce(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(typing.get_args(tp), value, key)
    return _coerce_scalar(tp, value, key)


def _coerce_union(choices: tuple[Any, ...], value: Any, key: str) -> Any:
    if value is None and type(None) in choices:
        return None
    errors = []
    for tp in (c for c in choices if c is not type(None)):
        try:
            return _coerce(tp, value, key)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(errors[0] if len(errors) == 1 else f"config key '{key}': none of {errors}")


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got a bool")
    if not isinstance(value, tp):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> scalar, for logging a config as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the config as YAML atomically (temp file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, p)
    return p
