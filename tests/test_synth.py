"""Synthetic faces: real formats, determinism, flags and subset lists, and that they can be learnt."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from source_readers import read_ferplus, read_source

from ranray import cli
from ranray.config import CLASS_NAMES
from ranray.data.synth import SynthOptions, synthesize


def _csv(path) -> list[list[str]]:
    return list(csv.reader(path.open()))


def test_ferplus_pair_is_in_the_real_format(tmp_path):
    res = synthesize(tmp_path / "fp", SynthOptions(n=60, seed=4, non_face_frac=0.05, large_pose_frac=0.3))
    fer, new = _csv(res.root / "fer2013.csv"), _csv(res.root / "fer2013new.csv")
    assert fer[0] == ["emotion", "pixels", "Usage"]
    assert new[0][:2] == ["Usage", "Image name"] and new[0][2:] == [*CLASS_NAMES, "unknown", "NF"]
    assert len(fer) == len(new) == 61 and [r[2] for r in fer[1:]] == [r[0] for r in new[1:]]
    assert {len(r[1].split()) for r in fer[1:]} == {48 * 48}
    assert all(sum(map(int, r[2:])) == 10 for r in new[1:])
    non_faces = [r for r in new[1:] if not r[1]]
    assert len(non_faces) == 3 and all(int(r[-1]) >= 6 for r in non_faces)
    usage = [r[0] for r in new[1:]]
    assert (usage.count("Training"), usage.count("PublicTest"), usage.count("PrivateTest")) == (48, 6, 6)
    # Votes centre on the true class: the FERPlus majority label is the drawn label for most faces.
    truth = {r[0]: int(r[1]) for r in _csv(res.root / "landmarks.csv")[1:]}
    rows = [r for r in read_ferplus([str(res.root)]).rows if not r.reason]
    assert len(rows) >= 45 and all(r.label == truth[r.key] for r in rows)
    # Subset lists name faces whose flags say so; pose45 faces are pose30 faces too.
    pose30 = set((res.root / "pose30_list.txt").read_text().split())
    pose45 = set((res.root / "pose45_list.txt").read_text().split())
    assert pose45 <= pose30 and len(pose30) >= 8 and pose30 <= set(truth)


def test_same_options_same_bytes_other_seed_other_faces(tmp_path):
    a = synthesize(tmp_path / "a", SynthOptions(n=10, seed=7))
    b = synthesize(tmp_path / "b", SynthOptions(n=10, seed=7))
    c = synthesize(tmp_path / "c", SynthOptions(n=10, seed=8))
    for name in ("fer2013.csv", "fer2013new.csv", "landmarks.csv"):
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes()
    assert (a.root / "fer2013.csv").read_bytes() != (c.root / "fer2013.csv").read_bytes()
    with pytest.raises(FileExistsError):
        synthesize(a.root, SynthOptions(n=10, seed=7))


def test_image_folder_and_wild_variants(tmp_path):
    res = synthesize(tmp_path / "f", SynthOptions(n=16, seed=1, format="imagefolder"))
    rows = read_source(res.prepare_config(tmp_path / "out")).rows
    assert len(rows) == 16 and {r.split for r in rows} == {"train", "val", "test"}
    with Image.open(rows[0].path) as img:
        assert img.size == (112, 112) and img.mode == "RGB"
    wild = synthesize(tmp_path / "w", SynthOptions(n=4, seed=1, format="imagefolder", wild=True))
    assert wild.prepare_config(tmp_path / "wout").detector == "hog"
    marks = _csv(wild.root / "landmarks.csv")[1:]
    pts = np.array([list(map(float, r[3:])) for r in marks]).reshape(-1, 68, 2)
    assert pts.min() >= 0 and pts.max() < 256  # the whole face is inside the scene


def test_identity_folder_with_verification_pairs(tmp_path):
    res = synthesize(tmp_path / "ids", SynthOptions(n=48, seed=2, format="identity", per_identity=6, pairs=20))
    read = read_source(res.prepare_config(tmp_path / "out"))
    by_key = {r.key: r for r in read.rows}
    assert len(read.rows) == 48 and res.counts == {"train": 36, "val": 12}
    pairs = [line.split() for line in (res.root / "pairs.txt").read_text().splitlines()]
    assert len(pairs) == 20 and {p[2] for p in pairs} == {"0", "1"}
    for a, b, same in pairs:
        assert by_key[a].split == by_key[b].split == "val"
        assert (by_key[a].label == by_key[b].label) == (same == "1")


def test_synth_cli_prints_the_prepare_command(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path / "s"), "--n", "8", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "synthesized 8 ferplus images" in out and "ranray prepare ferplus" in out
    info = json.loads((tmp_path / "s" / "synth.json").read_text())
    assert info["options"]["seed"] == 3 and sum(info["counts"].values()) == 8


def _tiny_cnn(width: int = 8) -> torch.nn.Module:
    def block(i: int, o: int) -> list[torch.nn.Module]:
        return [torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]

    return torch.nn.Sequential(*block(1, width), *block(width, 2 * width), *block(2 * width, 4 * width),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4 * width, 8))


def test_expressions_are_learnable_far_above_chance(tmp_path):
    """A 6k-parameter CNN, a few seconds of CPU, on the raw 48x48 FERPlus pixels of clean faces."""
    res = synthesize(tmp_path / "fp", SynthOptions(n=640, seed=3, occlusion_frac=0.0, large_pose_frac=0.0,
                                                   non_face_frac=0.0))
    rows = [r for r in read_ferplus([str(res.root)]).rows if not r.reason]  # FERPlus majority labels
    x = torch.tensor(np.stack([np.array(r.pixels.split(), np.float32).reshape(1, 48, 48) for r in rows]))
    x = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-3)
    y = torch.tensor([r.label for r in rows])
    train = torch.tensor([r.split == "train" for r in rows])
    torch.manual_seed(0)
    net, epochs, batch = _tiny_cnn(), 15, 32
    steps = epochs * -(-int(train.sum()) // batch)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=steps)
    xtr, ytr = x[train], y[train]
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(xtr)).split(batch):
            xb = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, xtr[idx].flip(-1), xtr[idx])
            loss = torch.nn.functional.cross_entropy(net(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x[~train]).argmax(1) == y[~train]).float().mean().item()
    assert accuracy >= 0.5, accuracy  # chance is 0.125
