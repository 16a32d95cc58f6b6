"""The loader contract (docs/ARCHITECTURE.md "Loader"): sharding, shuffling, resume, both backends,
bad input, augmentation. Real DALI (CPU, device_id=None), real Parquet shards, real Ray Train."""

from __future__ import annotations

import io
import json
import logging
import shutil
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from ranray.config import AugmentConfig
from ranray.data.augment import FLIP_68
from ranray.data.loader import build_loader
from ranray.data.schema import (FACE_SIZE, FLAG_OCCLUSION, NUM_LANDMARKS, PIXEL_MEAN, PIXEL_STD, denormalize,
                                normalize, shard_paths)
from ranray.data.shards import num_batches, plan_rank
from ranray.inference import face_tensor

sys.path.insert(0, str(Path(__file__).parent))
from shard_fixtures import template_landmarks, write_dataset  # noqa: E402

TRAIN_ROWS, VAL_ROWS = 37, 13  # odd on purpose: uneven shares across ranks
NO_AUG = AugmentConfig(enabled=False)
GEOMETRY_ONLY = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0, blur_prob=0.0, erase_prob=0.0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    # 8 rows per shard in row groups of 4: 10 blocks in train, more than one shuffle window
    return write_dataset(tmp_path_factory.mktemp("ds"), {"train": TRAIN_ROWS, "val": VAL_ROWS},
                         rows_per_shard=8, row_group_size=4)


def split_keys(split: str, n: int) -> set[str]:
    return {f"{split}/{i:05d}.png" for i in range(n)}


def keys_of(loader) -> list[list[str]]:
    return [batch["keys"] for batch in loader]


def flat(batches: list[list[str]]) -> list[str]:
    return [k for b in batches for k in b]


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [False, True])
def test_plan_covers_every_row_once_with_equal_batch_counts(drop_last):
    for total in range(0, 40):
        for world in (1, 2, 3, 4):
            for batch in (1, 2, 5):
                order = np.random.default_rng(total).permutation(total)
                plans = [plan_rank(order, rank=r, world_size=world, batch_size=batch, drop_last=drop_last)
                         for r in range(world)]
                nb = num_batches(total, world, batch, drop_last)
                assert all(len(p) == nb for p in plans)
                assert all(len(p.batch(i)) >= 1 for p in plans for i in range(nb))
                assert all(len(p.batch(i)) <= batch for p in plans for i in range(nb))
                seen = np.concatenate([p.rows for p in plans]) if plans else np.zeros(0)
                padded = sum(p.padded for p in plans)
                if drop_last:
                    assert len(set(seen.tolist())) == len(seen) and total - len(seen) < world * batch
                elif padded == 0:
                    assert sorted(seen.tolist()) == list(range(total))
                else:  # only tiny splits: fewer rows than ranks, or batch 1 with an uneven split
                    assert total < world or batch == 1
                    assert set(seen.tolist()) == set(range(total))


@pytest.mark.parametrize("training", [False, True])
def test_two_ranks_read_disjoint_parts_covering_the_split(data_dir, training):
    loaders = [build_loader(data_dir, "train", batch_size=4, rank=r, world_size=2, training=training,
                            augment=NO_AUG, num_threads=1) for r in range(2)]
    batches = [keys_of(ld) for ld in loaders]
    assert len(loaders[0]) == len(loaders[1]) == len(batches[0]) == len(batches[1])
    k0, k1 = flat(batches[0]), flat(batches[1])
    assert not set(k0) & set(k1)
    assert len(k0) == len(set(k0)) and len(k1) == len(set(k1))
    union = set(k0) | set(k1)
    if training:  # drop_last: all but fewer than world * batch rows, whole batches only
        assert union <= split_keys("train", TRAIN_ROWS) and TRAIN_ROWS - len(union) < 2 * 4
        assert all(len(b) == 4 for rank in batches for b in rank)
    else:
        assert union == split_keys("train", TRAIN_ROWS)


def _ray_worker(config: dict) -> None:
    import ray.train

    from ranray.data.loader import build_loader as build

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    loader = build(config["data_dir"], "train", batch_size=4, rank=rank, world_size=world, training=True,
                   augment=AugmentConfig(enabled=False), num_threads=1)
    loader.set_epoch(1)
    batches = [b["keys"] for b in loader]
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"len": len(loader), "batches": batches}))
    ray.train.report({"batches": len(batches)})


def test_real_ray_torch_trainer_two_workers(data_dir, tmp_path, ray_session):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    out = tmp_path / "keys"
    out.mkdir()
    trainer = TorchTrainer(
        _ray_worker, train_loop_config={"data_dir": str(data_dir), "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="loader-two-workers", storage_path=str(tmp_path / "ray")))
    trainer.fit()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["len"] == ranks[1]["len"] == len(ranks[0]["batches"]) == len(ranks[1]["batches"]) > 0
    k0, k1 = flat(ranks[0]["batches"]), flat(ranks[1]["batches"])
    assert not set(k0) & set(k1) and len(set(k0)) == len(k0) and len(set(k1)) == len(k1)
    assert TRAIN_ROWS - len(set(k0) | set(k1)) < 2 * 4
    # the same layout as two simulated ranks: Ray's ranks are the loader's ranks
    local = [build_loader(data_dir, "train", batch_size=4, rank=r, world_size=2, training=True, augment=NO_AUG,
                          num_threads=1) for r in range(2)]
    for ld in local:
        ld.set_epoch(1)
    assert [keys_of(ld) for ld in local] == [ranks[0]["batches"], ranks[1]["batches"]]


# ---------------------------------------------------------------------------------------------
# Shuffling and resume
# ---------------------------------------------------------------------------------------------


def test_shuffle_is_seeded_and_changes_per_epoch(data_dir):
    def order(seed: int, epoch: int) -> list[str]:
        ld = build_loader(data_dir, "train", batch_size=8, seed=seed, training=True, augment=NO_AUG,
                          num_threads=1)
        ld.set_epoch(epoch)
        return flat(keys_of(ld))

    first = order(seed=5, epoch=0)
    assert first == order(seed=5, epoch=0)
    assert first != order(seed=5, epoch=1)
    assert first != order(seed=6, epoch=0)
    assert first != sorted(first)  # shuffled at all
    # rows of different shards share a batch: the window shuffle mixes row groups
    ld = build_loader(data_dir, "train", batch_size=8, seed=5, training=True, augment=NO_AUG, num_threads=1)
    shards_per_batch = [len({int(k.split("/")[1][:5]) // 8 for k in b}) for b in keys_of(ld)]
    assert max(shards_per_batch) > 1


def test_eval_reads_in_stored_order(data_dir):
    ld = build_loader(data_dir, "val", batch_size=5, num_threads=1)
    assert flat(keys_of(ld)) == sorted(split_keys("val", VAL_ROWS))


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_resume_mid_epoch_yields_exactly_the_unseen_rows(data_dir, backend):
    def make():
        ld = build_loader(data_dir, "train", batch_size=4, rank=1, world_size=2, seed=3, training=True,
                          augment=GEOMETRY_ONLY, backend=backend, num_threads=1)
        ld.set_epoch(2)
        return ld

    full = list(make())
    first = make()
    k = 2
    seen = [b["keys"] for b in islice(first, k)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["batches"] == k

    resumed = build_loader(data_dir, "train", batch_size=4, rank=1, world_size=2, seed=0, training=True,
                           augment=GEOMETRY_ONLY, backend=backend, num_threads=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what a training loop does on resume: the same epoch keeps the position
    rest = list(resumed)
    assert [b["keys"] for b in rest] == [b["keys"] for b in full[k:]]
    assert set(flat(seen)).isdisjoint(flat([b["keys"] for b in rest]))
    assert sorted(flat(seen) + flat([b["keys"] for b in rest])) == sorted(flat([b["keys"] for b in full]))
    # the augmentation is drawn from (seed, epoch, rank, batch): resumed batches are pixel-identical
    for a, b in zip(rest, full[k:]):
        torch.testing.assert_close(a["images"], b["images"])
        torch.testing.assert_close(a["landmarks"], b["landmarks"])
    assert resumed.state_dict()["batches"] == len(resumed)
    resumed.set_epoch(3)
    assert resumed.state_dict()["batches"] == 0


def _loaders(data_dir, world: int, state: dict | None = None, epoch: int = 2) -> list:
    out = []
    for r in range(world):
        ld = build_loader(data_dir, "train", batch_size=4, rank=r, world_size=world, seed=3, training=True,
                          augment=NO_AUG, backend="torch", num_threads=0)
        if state is not None:
            ld.load_state_dict(state)
        ld.set_epoch(epoch)
        out.append(ld)
    return out


def _take(loaders: list, n: int | None) -> list[str]:
    """The keys of the next n batches (all if None) of every rank; the ranks' batch counts agree."""
    parts = [flat([b["keys"] for b in islice(ld, n)]) for ld in loaders]
    assert len({len(ld) for ld in loaders}) == 1
    return flat(parts)


@pytest.mark.parametrize("worlds", [(2, 1), (2, 3), (2, 3, 1)])
def test_resume_on_other_world_sizes_uses_every_row_of_the_epoch_once(data_dir, worlds):
    """Stop mid-epoch on 2 ranks, go on with 1, 3, or 3 then 1: the rows the epoch had not used are
    re-planned over the new ranks (without drop_last), so the epoch uses each of its rows once."""
    loaders = _loaders(data_dir, worlds[0])
    used = _take(loaders, 2)
    for i, world in enumerate(worlds[1:]):
        state = loaders[0].state_dict()
        assert state["position"] == len(used)  # the global sample position of the epoch
        loaders = _loaders(data_dir, world, state)
        assert 0 < loaders[0].epoch_progress() < 1
        used += _take(loaders, 1 if i < len(worlds) - 2 else None)
    assert sorted(used) == sorted(split_keys("train", TRAIN_ROWS))  # each row once, none dropped
    assert all(ld.epoch_finished() and ld.epoch_progress() == 1.0 for ld in loaders)
    assert min(len(b["keys"]) for b in _loaders(data_dir, worlds[-1], state)[0]) >= 2  # no batch of one
    loaders[0].set_epoch(3)  # the next epoch is whole again, on the new world size
    assert loaders[0].state_dict()["segments"] == [] and len(loaders[0]) == num_batches(TRAIN_ROWS, worlds[-1], 4, True)


# ---------------------------------------------------------------------------------------------
# Output contract, backends, subsets
# ---------------------------------------------------------------------------------------------


def test_output_contract_and_channels_last(data_dir):
    plain = next(iter(build_loader(data_dir, "val", batch_size=6, num_threads=1)))
    cl = next(iter(build_loader(data_dir, "val", batch_size=6, num_threads=1, channels_last=True)))
    assert plain["images"].shape == (6, 3, FACE_SIZE, FACE_SIZE) and plain["images"].dtype == torch.float32
    assert -1.0 <= plain["images"].min() and plain["images"].max() <= 1.0
    assert plain["labels"].dtype == torch.long and plain["labels"].shape == (6,)
    assert plain["targets"].dtype == torch.float32 and plain["targets"].shape == (6, 8)
    assert plain["landmarks"].dtype == torch.float32 and plain["landmarks"].shape == (6, NUM_LANDMARKS, 2)
    assert plain["flags"].dtype == torch.int32 and plain["flags"].shape == (6,)
    assert plain["keys"] == [f"val/{i:05d}.png" for i in range(6)]
    assert torch.equal(plain["labels"], torch.arange(6) % 8)
    assert torch.equal(plain["targets"].argmax(1), plain["labels"])
    assert cl["images"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl["images"], plain["images"])


def _lossless_copy(src: Path, dst: Path, split: str) -> Path:
    """The prepared dataset `src` with `split`'s faces re-encoded as PNG: every decoder then agrees."""
    shutil.copytree(src, dst)
    for path in shard_paths(dst, split):
        table = pq.read_table(path)
        png = []
        for data in table.column("image").to_pylist():
            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).convert("RGB").save(buf, "PNG")
            png.append(buf.getvalue())
        table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(png, pa.binary()))
        groups = pq.ParquetFile(src / split / path.name).metadata.row_group(0).num_rows
        pq.write_table(table, path, row_group_size=groups)  # the same blocks as the original
    return dst


def _faces(data: Path, split: str) -> dict[str, Image.Image]:
    """key -> the stored face, decoded as `predict` gets an aligned one (an RGB PIL image)."""
    return {key: Image.open(io.BytesIO(image)).convert("RGB")
            for path in shard_paths(data, split)
            for key, image in zip(*pq.read_table(path, columns=["key", "image"]).to_pydict().values())}


def test_dali_torch_and_prediction_inputs_agree(data_dir, tmp_path):
    """Both loader backends and prediction's preprocessing (ranray.inference.face_tensor) feed
    the model the same normalised tensor for the same face (ranray.data.schema.normalize)."""
    def run(data: Path, backend: str, **kw) -> list[dict]:
        return list(build_loader(data, "train", batch_size=8, seed=1, backend=backend, num_threads=1, **kw))

    # JPEG as prepared: DALI's decoder may round a level differently from PIL's
    for kw, max_tol, mean_tol in [({}, 2 / PIXEL_STD, 0.1 / PIXEL_STD),  # decoding only
                                  ({"training": True}, 4 / PIXEL_STD, 1 / PIXEL_STD)]:  # with every augmentation
        dali, tch = run(data_dir, "dali", **kw), run(data_dir, "torch", **kw)
        assert len(dali) == len(tch) > 0
        for a, b in zip(dali, tch):
            assert a["keys"] == b["keys"]
            assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["targets"], b["targets"])
            torch.testing.assert_close(a["landmarks"], b["landmarks"])
            diff = (a["images"] - b["images"]).abs()
            assert diff.max() <= max_tol and diff.mean() <= mean_tol, (kw, diff.max(), diff.mean())

    # Lossless faces: all three see the same pixels, so only the normalisation is left to differ
    lossless = _lossless_copy(data_dir, tmp_path / "png", "train")
    faces = _faces(lossless, "train")
    dali, tch = run(lossless, "dali"), run(lossless, "torch")
    assert len(dali) == len(tch) > 0
    for a, b in zip(dali, tch):
        assert a["keys"] == b["keys"]
        pixels = torch.from_numpy(np.stack([np.asarray(faces[k]) for k in b["keys"]])).permute(0, 3, 1, 2)
        assert torch.equal(b["images"], normalize(pixels))
        assert torch.equal(torch.cat([face_tensor(faces[k]) for k in b["keys"]]), b["images"])
        # crop_mirror_normalize multiplies by 1 / std where torch divides: the last bit may differ
        torch.testing.assert_close(a["images"], b["images"], rtol=0, atol=1e-6)
        assert torch.equal(denormalize(b["images"]), pixels)  # (DALI's, a last bit low, may truncate a level low)


def test_denormalize_inverts_normalize():
    levels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16).repeat(3, axis=1)
    as_numpy, as_torch = normalize(levels), normalize(torch.from_numpy(levels))
    assert as_numpy.dtype == np.float32 and as_torch.dtype == torch.float32
    assert np.array_equal(as_numpy, as_torch.numpy())  # one formula, whichever array type
    assert as_numpy.min() == -1.0 and as_numpy.max() == 1.0  # 0..255 -> [-1, 1]
    assert np.array_equal(as_numpy, (levels.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD)
    assert np.array_equal(denormalize(as_numpy), levels)
    assert torch.equal(denormalize(as_torch), torch.from_numpy(levels))
    floats = torch.from_numpy(levels).float()
    assert normalize(floats, inplace=True) is floats and torch.equal(floats, as_torch)
    assert normalize(levels) is not levels and levels.dtype == np.uint8  # integer input: never overwritten
    # augmented values may leave [-1, 1]; for display they are clipped
    assert denormalize(np.array([-1.5, -1.0, 1.0, 1.2], np.float32)).tolist() == [0, 0, 255, 255]


def test_subset_filters_rows_by_flag(data_dir):
    ld = build_loader(data_dir, "val", batch_size=4, subset="occlusion", num_threads=1)
    batches = list(ld)
    keys = flat([b["keys"] for b in batches])
    assert keys == [f"val/{i:05d}.png" for i in range(VAL_ROWS) if i % 4 == 0]
    assert all((b["flags"] & FLAG_OCCLUSION).all() for b in batches)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_corrupt_images_are_skipped_logged_and_counted(tmp_path, backend, caplog):
    bad = {2: "garbage", 5: "bad_jpeg", 6: "wrong_size", 8: "garbage", 9: "bad_jpeg", 10: "garbage",
           11: "wrong_size"}  # rows 8..11 are a whole batch of 4
    data = write_dataset(tmp_path / "ds", {"val": 14}, rows_per_shard=14, row_group_size=7, corrupt={"val": bad})
    ld = build_loader(data, "val", batch_size=4, backend=backend, num_threads=1)
    with caplog.at_level(logging.WARNING, logger="ranray.data.loader"):
        batches = [b["keys"] for b in ld]
    assert len(batches) == len(ld) == 4  # batch counts never change, so ranks stay in step
    good = [f"val/{i:05d}.png" for i in range(14) if i not in bad]
    assert batches[0] == good[:3] and batches[1] == good[3:5]
    assert batches[2] == ["val/00012.png"]  # the all-bad batch: replaced by the next row that decodes
    assert batches[3] == ["val/00012.png", "val/00013.png"]
    assert ld.skipped == len(bad) and ld.state_dict()["skipped"] == len(bad)
    messages = [r.getMessage() for r in caplog.records if "bad image skipped" in r.getMessage()]
    assert len(messages) == len(bad)
    assert any("part-00000.parquet row 5 (val/00005.png)" in m for m in messages)


def test_unreadable_shard_is_reported_and_left_out(tmp_path, caplog):
    data = write_dataset(tmp_path / "ds", {"val": 12}, rows_per_shard=6, row_group_size=6)
    (data / "val" / "part-00001.parquet").write_bytes(b"PAR1 truncated")
    with caplog.at_level(logging.WARNING, logger="ranray.data.loader"):
        ld = build_loader(data, "val", batch_size=4, num_threads=1)
        keys = flat(keys_of(ld))
    assert keys == [f"val/{i:05d}.png" for i in range(6)]
    assert any("part-00001.parquet" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------

MARKS = {36: (255, 0, 0), 45: (0, 255, 0), 48: (0, 0, 255)}  # right eye, left eye, mouth corner


def _draw_marks(rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """Black image with a coloured disc on three landmarks: the pixels tell where each point went."""
    lm = template_landmarks() + rng.uniform(-3, 3, (NUM_LANDMARKS, 2)).astype(np.float32)
    img = Image.new("RGB", (FACE_SIZE, FACE_SIZE), (0, 0, 0))
    d = ImageDraw.Draw(img)
    for i, colour in MARKS.items():
        x, y = np.round(lm[i])
        lm[i] = (x, y)  # the disc's centre pixel is the landmark (pixel-index convention)
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    return img, lm


def _centroid(img: np.ndarray, channel: int, near: np.ndarray) -> np.ndarray:
    x0, y0 = (max(0, int(round(v)) - 7) for v in near)
    patch = img[channel, y0:y0 + 15, x0:x0 + 15].clip(0)
    ys, xs = np.mgrid[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]]
    return np.array([(patch * xs).sum(), (patch * ys).sum()]) / patch.sum()


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_flip_mirrors_pixels_and_landmarks(tmp_path, backend):
    data = write_dataset(tmp_path / "ds", {"train": 16}, draw=_draw_marks)
    flip_only = AugmentConfig(rotate_deg=0.0, scale_min=1.0, scale_max=1.0, brightness=0.0, contrast=0.0,
                              saturation=0.0, blur_prob=0.0, erase_prob=0.0)
    kw = dict(batch_size=16, training=True, backend=backend, num_threads=1, seed=4)
    plain = next(iter(build_loader(data, "train", augment=NO_AUG, **kw)))
    aug = next(iter(build_loader(data, "train", augment=flip_only, **kw)))
    assert aug["keys"] == plain["keys"]
    flipped = []
    for i in range(16):
        a, p = aug["images"][i], plain["images"][i]
        if torch.allclose(a, p, atol=1e-4):  # the torch path resamples: equal up to float rounding
            torch.testing.assert_close(aug["landmarks"][i], plain["landmarks"][i])
            continue
        torch.testing.assert_close(a, p.flip(-1), atol=1e-4, rtol=0)
        expected = plain["landmarks"][i][torch.from_numpy(FLIP_68)]
        expected[:, 0] = FACE_SIZE - 1 - expected[:, 0]
        torch.testing.assert_close(aug["landmarks"][i], expected)
        # a value: the new right-eye corner (36) is the mirrored old left-eye corner (45)
        assert aug["landmarks"][i, 36, 0].item() == pytest.approx(111.0 - plain["landmarks"][i, 45, 0].item())
        flipped.append(i)
    assert 0 < len(flipped) < 16


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_rotation_scale_flip_move_landmarks_with_the_pixels(tmp_path, backend):
    data = write_dataset(tmp_path / "ds", {"train": 12}, draw=_draw_marks)
    geo = AugmentConfig(rotate_deg=15.0, scale_min=0.85, scale_max=1.15, brightness=0.0, contrast=0.0,
                        saturation=0.0, blur_prob=0.0, erase_prob=0.0)
    batch = next(iter(build_loader(data, "train", batch_size=12, training=True, augment=geo, backend=backend,
                                   num_threads=1, seed=2)))
    imgs = batch["images"].numpy() * PIXEL_STD + PIXEL_MEAN
    lms = batch["landmarks"].numpy()
    states = set()
    for img, lm in zip(imgs, lms):
        # unflipped: point 36 carries the red disc; flipped: it carries 45's green one
        y, x = np.round(lm[36][::-1]).astype(int)
        red_at_36 = img[0, y, x] > img[1, y, x]
        states.add(bool(red_at_36))
        colour_of = {36: 0, 45: 1, 48: 2} if red_at_36 else {36: 1, 45: 0, 54: 2}
        for point, channel in colour_of.items():
            assert np.abs(_centroid(img, channel, lm[point]) - lm[point]).max() < 0.75, (point, backend)
    assert states == {True, False}  # both flipped and unflipped samples were checked


def test_full_augmentation_changes_pixels_and_landmarks(data_dir):
    kw = dict(batch_size=8, training=True, num_threads=1, seed=9)
    plain = list(build_loader(data_dir, "train", augment=NO_AUG, **kw))
    aug = list(build_loader(data_dir, "train", augment=AugmentConfig(blur_prob=0.5, erase_prob=0.5), **kw))
    for a, p in zip(aug, plain):
        assert a["keys"] == p["keys"]
        # colour jitter works in float and is not clamped: at most brightness 1.2 x contrast 1.2 overshoot
        assert torch.isfinite(a["images"]).all() and a["images"].abs().max() <= 1.7
        per_image = (a["images"] - p["images"]).abs().flatten(1).mean(1)
        assert (per_image > 0.01).all()
        assert not torch.allclose(a["landmarks"], p["landmarks"])
