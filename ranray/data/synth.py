"""`ranray synth`: synthetic face datasets in the real formats, for the demo and the tests.

    synthesize(out_dir, SynthOptions(n=2000, seed=0, format="ferplus")) -> SynthResult

Formats (FORMAT_WRITERS):
  ferplus      fer2013.csv (48x48 grayscale pixels, Usage) + fer2013new.csv (10 votes drawn around
               the true class; a few non-face rows with an empty Image name, as in the real file)
  imagefolder  <split>/<class>/<key>.png colour faces (with `wild`: cluttered scenes for hog/cnn)
  identity     <split>/<identity>/<n>.png, several images per person, + pairs.txt ("key_a key_b same")
               over held-out identities in val/, for pretraining and its verification check

Beside every format: landmarks.csv (key, label, flags, 68 ground-truth points in image pixels),
occlusion_list.txt / pose30_list.txt / pose45_list.txt (one key per line, the subset-list format
prepare reads) and synth.json (the options and counts). The same options give the same bytes.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ranray.config import CLASS_NAMES, PrepareConfig
from ranray.data.schema import FLAG_OCCLUSION, FLAG_POSE30, FLAG_POSE45, SUBSET_FLAGS, SYNTH_MARKER
from ranray.data.sources.common import CLASS_TABLES
from ranray.data.sources.ferplus_labels import VOTE_COLUMNS
from ranray.data.synth_face import (DEFAULT_OCCLUDERS, OCCLUDERS, FaceSpec, Identity, Occluder, Pose, background,
                                    render, sample_identity)

SPLITS = (("train", "Training"), ("val", "PublicTest"), ("test", "PrivateTest"))
FORMAT_NAMES = ("ferplus", "imagefolder", "identity")
# Likely annotator confusions per class: where the votes that miss the true class go.
CONFUSIONS = {
    "neutral": ("sadness", "contempt"), "happiness": ("neutral", "surprise"), "surprise": ("fear", "happiness"),
    "sadness": ("neutral", "fear"), "anger": ("disgust", "sadness"), "disgust": ("anger", "contempt"),
    "fear": ("surprise", "sadness"), "contempt": ("neutral", "disgust"),
}
# FER2013's own emotion code for the `emotion` column (FERPlus ignores it); contempt has none and
# is written as neutral, the code most FERPlus contempt images carried.
FER2013_CODE = {label: code for code, label in CLASS_TABLES["fer2013"].items()}
FER2013_CODE[CLASS_NAMES.index("contempt")] = 6


@dataclass(frozen=True)
class SynthOptions:
    n: int = 2000  # images (identity format: identities x per_identity)
    seed: int = 0
    format: str = "ferplus"  # ferplus | imagefolder | identity
    size: int = 0  # image side; 0: 48 (ferplus), 112 (imagefolder, identity), 256 (wild)
    wild: bool = False  # imagefolder: the face at a random place and scale in a cluttered scene
    occlusion_frac: float = 0.15  # faces with sunglasses, a mask, a hand or blocks (flagged)
    # The test split's occluded share; None: occlusion_frac (the occlusion study wants half its test
    # faces covered while training sees fewer)
    test_occlusion_frac: float | None = None
    occluders: tuple[str, ...] = DEFAULT_OCCLUDERS  # kinds drawn from (OCCLUDERS), uniformly
    large_pose_frac: float = 0.15  # faces turned 30-60 degrees (flagged pose30, and pose45 past 45)
    split_fracs: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test
    non_face_frac: float = 0.01  # ferplus: rows of clutter voted NF (rejected by prepare)
    agreement: tuple[float, float] = (0.75, 1.0)  # ferplus: share of the 10 votes for the true class
    strength: tuple[float, float] = (0.9, 1.25)  # expression intensity
    noise: float = 5.0  # max Gaussian pixel noise (sigma, 0..255 scale)
    per_identity: int = 8  # identity format
    verify_frac: float = 0.2  # identity format: share of identities held out in val/ for pairs.txt
    pairs: int = 400  # identity format: verification pairs (half same, half different)

    def validate(self) -> None:
        checks = {
            "n must be >= 1": self.n >= 1,
            f"format must be one of {sorted(FORMAT_NAMES)}": self.format in FORMAT_NAMES,
            "split_fracs must be 3 fractions summing to 1": len(self.split_fracs) == 3
            and abs(sum(self.split_fracs) - 1.0) < 1e-6 and min(self.split_fracs) >= 0,
            "occlusion_frac, test_occlusion_frac, large_pose_frac and non_face_frac must be in [0, 1]":
                all(0.0 <= f <= 1.0 for f in (self.occlusion_frac, self.occlusion_frac_for("test"),
                                              self.large_pose_frac, self.non_face_frac)),
            f"occluders must be a non-empty subset of {sorted(OCCLUDERS)}":
                len(self.occluders) > 0 and set(self.occluders) <= set(OCCLUDERS),
            "per_identity must be >= 2 (verification pairs need two images of a person)": self.per_identity >= 2,
            "size must be 0 (default) or >= 32": self.size == 0 or self.size >= 32,
        }
        failed = [what for what, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"synth options: {'; '.join(failed)}")

    def occlusion_frac_for(self, split: str) -> float:
        test = self.test_occlusion_frac
        return test if split == "test" and test is not None else self.occlusion_frac

    def image_size(self) -> int:
        if self.size:
            return self.size
        return {"ferplus": 48}.get(self.format, 256 if self.wild else 112)


@dataclass
class SynthResult:
    root: Path
    options: SynthOptions
    counts: dict[str, int]  # images per split
    subset_lists: dict[str, str]  # subset -> list file

    def prepare_config(self, out: str | Path, **overrides) -> PrepareConfig:
        """The PrepareConfig that prepares this synthetic dataset into `out`."""
        # Each synthetic format is written as the real format of the source of the same name.
        detector = "hog" if self.options.wild else "given"
        values = dict(source=self.options.format, inputs=[str(self.root)], out=str(out), detector=detector,
                      subset_lists=dict(self.subset_lists))
        values.update(overrides)
        cfg = PrepareConfig(**values)
        cfg.validate()
        return cfg


# ---------------------------------------------------------------------------------------------
# Sampling one face
# ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    key: str
    split: str
    label: int
    spec: FaceSpec

    @property
    def flags(self) -> int:
        yaw = abs(self.spec.pose.yaw)
        return ((FLAG_OCCLUSION if self.spec.occluder else 0) | (FLAG_POSE30 if yaw > 30 else 0)
                | (FLAG_POSE45 if yaw > 45 else 0))


def sample_spec(opts: SynthOptions, index: int, label: int, identity: Identity | None = None,
                split: str = "train") -> FaceSpec:
    """Face `index` of the dataset: depends only on (seed, index, label, identity, split), not on n."""
    rng = np.random.default_rng([opts.seed, index, 1])
    ident = identity or sample_identity(rng)
    if rng.random() < opts.large_pose_frac:
        yaw = float(rng.choice([-1.0, 1.0]) * rng.uniform(30.5, 60.0))
    else:
        yaw = float(np.clip(rng.normal(0, 8), -20, 20))
    occluder = None
    if rng.random() < opts.occlusion_frac_for(split):
        occluder = Occluder(kind=str(rng.choice(sorted(opts.occluders))), seed=int(rng.integers(2 ** 31)))
    return FaceSpec(
        identity=ident, label=label, strength=float(rng.uniform(*opts.strength)), flip_side=bool(rng.integers(2)),
        pose=Pose(yaw=yaw, pitch=float(np.clip(rng.normal(0, 6), -15, 15)),
                  roll=float(np.clip(rng.normal(0, 6), -15, 15))),
        occluder=occluder, light_angle=float(rng.uniform(0, 2 * math.pi)), light_strength=float(rng.uniform(0, 0.3)),
        brightness=float(rng.normal(0, 12)), contrast=float(rng.uniform(0.8, 1.1)),
        noise=float(rng.uniform(0, opts.noise)), background_seed=int(rng.integers(2 ** 31)), wild=opts.wild)


def _supersample(size: int) -> int:
    """Draw at >= 192 px and downsample: anti-aliased features at 48x48."""
    return max(2, math.ceil(192 / size))


def draw(sample: Sample, size: int) -> tuple[Image.Image, np.ndarray]:
    rendered = render(sample.spec, size, _supersample(size))
    return rendered.image, rendered.landmarks


def split_plan(n: int, opts: SynthOptions) -> list[tuple[str, int]]:
    """(split, label) per index: splits in the given fractions, classes balanced inside each split."""
    rng = np.random.default_rng([opts.seed, 0])
    order = rng.permutation(n)
    bounds = np.cumsum([round(f * n) for f in opts.split_fracs[:-1]])
    plan: list[tuple[str, int]] = [("", 0)] * n
    for s, chunk in enumerate(np.split(order, bounds)):
        for pos, index in enumerate(sorted(chunk)):
            plan[index] = (SPLITS[s][0], pos % len(CLASS_NAMES))
    return plan


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def _write_truth(root: Path, samples: list[Sample], landmarks: dict[str, np.ndarray]) -> dict[str, str]:
    """landmarks.csv and the subset lists; returns {subset: list path}."""
    with (root / "landmarks.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "label", "flags"] + [f"{a}{i}" for i in range(68) for a in "xy"])
        for s in samples:
            if s.key in landmarks:
                w.writerow([s.key, s.label, s.flags] + [f"{v:.2f}" for v in landmarks[s.key].reshape(-1)])
    lists = {}
    for subset, bit in SUBSET_FLAGS.items():
        path = root / f"{subset}_list.txt"
        path.write_text("".join(f"{s.key}\n" for s in samples if s.flags & bit and s.key in landmarks))
        lists[subset] = str(path)
    return lists


def _votes(rng: np.random.Generator, label: int, opts: SynthOptions) -> list[int]:
    """10 annotators: most vote the true class, the rest a likely confusion or unknown."""
    probs = np.zeros(len(VOTE_COLUMNS))
    agree = rng.uniform(*opts.agreement)
    probs[label] = agree
    for other in CONFUSIONS[CLASS_NAMES[label]]:
        probs[CLASS_NAMES.index(other)] += (1 - agree) * 0.4
    probs[VOTE_COLUMNS.index("unknown")] += (1 - agree) * 0.2
    return rng.multinomial(10, probs / probs.sum()).tolist()


def _non_face(opts: SynthOptions, index: int, size: int) -> Image.Image:
    """Clutter only: what FERPlus annotators mark NF."""
    rng = np.random.default_rng([opts.seed, index, 2])
    spec = replace(sample_spec(opts, index, 0), wild=True)
    img = background(size * _supersample(size), spec, rng)
    return img.resize((size, size), Image.Resampling.LANCZOS)


Written = tuple[list[Sample], dict[str, np.ndarray], dict[str, int]]  # samples, landmarks by key, split counts


def write_ferplus(root: Path, opts: SynthOptions) -> Written:
    size = opts.image_size()
    plan = split_plan(opts.n, opts)
    usage = dict(SPLITS)
    rng = np.random.default_rng([opts.seed, 3])
    non_face = set(rng.choice(opts.n, size=int(round(opts.non_face_frac * opts.n)), replace=False).tolist())
    samples, marks, counts = [], {}, {s: 0 for s, _ in SPLITS}
    with (root / "fer2013.csv").open("w", newline="") as f1, (root / "fer2013new.csv").open("w", newline="") as f2:
        fer, new = csv.writer(f1), csv.writer(f2)
        fer.writerow(["emotion", "pixels", "Usage"])
        new.writerow(["Usage", "Image name", *VOTE_COLUMNS])
        for i, (split, label) in enumerate(plan):
            vote_rng = np.random.default_rng([opts.seed, i, 4])
            if i in non_face:
                img, name = _non_face(opts, i, size), ""
                votes = [0] * 8 + [int(v) for v in _nf_votes(vote_rng)]
            else:
                name = f"fer{i:07d}.png"
                spec = sample_spec(opts, i, label, split=split)
                sample = Sample(key=name, split=split, label=label, spec=spec)
                img, marks[name] = draw(sample, size)
                samples.append(sample)
                votes = _votes(vote_rng, label, opts)
            pixels = " ".join(map(str, np.asarray(img.convert("L")).reshape(-1).tolist()))
            fer.writerow([FER2013_CODE[label], pixels, usage[split]])
            new.writerow([usage[split], name, *votes])
            counts[split] += 1
    return samples, marks, counts


def _nf_votes(rng: np.random.Generator) -> list[int]:
    nf = int(rng.integers(6, 11))
    return [10 - nf, nf]  # unknown, NF


def write_imagefolder(root: Path, opts: SynthOptions) -> Written:
    size = opts.image_size()
    samples, marks, counts = [], {}, {s: 0 for s, _ in SPLITS}
    for i, (split, label) in enumerate(split_plan(opts.n, opts)):
        key = f"{split}/{CLASS_NAMES[label]}/{i:07d}.png"
        sample = Sample(key=key, split=split, label=label, spec=sample_spec(opts, i, label, split=split))
        img, marks[key] = draw(sample, size)
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / key)
        samples.append(sample)
        counts[split] += 1
    return samples, marks, counts


def write_identity(root: Path, opts: SynthOptions) -> Written:
    size = opts.image_size()
    num_ids = max(4, opts.n // max(1, opts.per_identity))
    held_out = max(2, int(round(opts.verify_frac * num_ids)))
    samples, marks, counts = [], {}, {"train": 0, "val": 0}
    held_out_keys: dict[str, list[str]] = {}
    for ident_index in range(num_ids):
        split = "val" if ident_index >= num_ids - held_out else "train"
        ident = sample_identity(np.random.default_rng([opts.seed, ident_index, 5]))
        name = f"id{ident_index:05d}"
        for k in range(opts.per_identity):
            index = ident_index * opts.per_identity + k
            label = int(np.random.default_rng([opts.seed, index, 6]).integers(len(CLASS_NAMES)))
            key = f"{split}/{name}/{k:03d}.png"
            spec = sample_spec(opts, index, label, ident, split=split)
            sample = Sample(key=key, split=split, label=label, spec=spec)
            img, marks[key] = draw(sample, size)
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            img.save(root / key)
            samples.append(sample)
            if split == "val":
                held_out_keys.setdefault(name, []).append(key)
            counts[split] += 1
    _write_pairs(root / "pairs.txt", held_out_keys, opts)
    return samples, marks, counts


def _write_pairs(path: Path, by_identity: dict[str, list[str]], opts: SynthOptions) -> None:
    """Verification pairs over the held-out identities: half same person, half different."""
    rng = np.random.default_rng([opts.seed, 7])
    names = sorted(by_identity)
    lines = []
    for i in range(opts.pairs):
        if i % 2 == 0:
            keys = by_identity[names[rng.integers(len(names))]]
            a, b = rng.choice(len(keys), 2, replace=False)
            lines.append(f"{keys[a]} {keys[b]} 1")
        else:
            x, y = rng.choice(len(names), 2, replace=False)
            lines.append(f"{rng.choice(by_identity[names[x]])} {rng.choice(by_identity[names[y]])} 0")
    path.write_text("\n".join(lines) + "\n")


FORMAT_WRITERS: dict[str, Callable[[Path, SynthOptions], Written]] = {
    "ferplus": write_ferplus,
    "imagefolder": write_imagefolder,
    "identity": write_identity,
}
assert tuple(FORMAT_WRITERS) == FORMAT_NAMES


def synthesize(out_dir: str | Path, opts: SynthOptions = SynthOptions()) -> SynthResult:
    """Write a synthetic dataset of `opts.format` into out_dir (created; must be empty or absent)."""
    opts.validate()
    root = Path(out_dir)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; synth writes into a new folder")
    root.mkdir(parents=True, exist_ok=True)
    samples, marks, counts = FORMAT_WRITERS[opts.format](root, opts)
    lists = _write_truth(root, samples, marks)
    info = {"options": asdict(opts), "counts": counts, "classes": list(CLASS_NAMES),
            "flags": {k: sum(1 for s in samples if s.flags & bit) for k, bit in SUBSET_FLAGS.items()}}
    (root / SYNTH_MARKER).write_text(json.dumps(info, indent=1))
    return SynthResult(root=root, options=opts, counts=counts, subset_lists=lists)
