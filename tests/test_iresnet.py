"""iResNet backbones: insightface-compatible structure, keys, parameter counts and checkpoint loading."""

from __future__ import annotations

import pytest
import torch

from ranray.models import IResNet, create_model, list_models, load_backbone_state

LAYERS = {
    "iresnet18": [2, 2, 2, 2],
    "iresnet34": [3, 4, 6, 3],
    "iresnet50": [3, 4, 14, 3],
    "iresnet100": [3, 13, 30, 3],
    "iresnet200": [6, 26, 60, 6],
}
# Parameter counts of insightface arcface_torch's iresnets with the 512-d head (all parameters,
# the frozen embedding-BN scale included); r50 is the "43.6 M" quoted for it.
INSIGHTFACE_PARAMS = {
    "iresnet18": 24_025_600,
    "iresnet34": 34_139_328,
    "iresnet50": 43_590_848,
    "iresnet100": 65_156_160,
    "iresnet200": 118_833_920,
}


def closed_form_params(layers, widths=(64, 128, 256, 512), emb=512) -> int:
    """Count from the block recipe alone: BN (2 per channel), PReLU (1), bias-free convs, fc with bias."""
    n = 3 * widths[0] * 9 + 2 * widths[0] + widths[0]  # stem conv, bn1, prelu
    cin = widths[0]
    for blocks, c in zip(layers, widths):
        for i in range(blocks):
            n += 2 * cin + cin * c * 9 + 2 * c + c + c * c * 9 + 2 * c  # bn1 conv1 bn2 prelu conv2 bn3
            if i == 0:
                n += cin * c + 2 * c  # downsample conv1x1 + bn
            cin = c
    return n + 2 * widths[-1] + widths[-1] * 49 * emb + emb + 2 * emb  # bn2, fc, features


def insightface_keys(layers) -> list[str]:
    def bn(p):
        return [f"{p}.weight", f"{p}.bias", f"{p}.running_mean", f"{p}.running_var", f"{p}.num_batches_tracked"]

    keys = ["conv1.weight", *bn("bn1"), "prelu.weight"]
    for s, blocks in enumerate(layers, start=1):
        for i in range(blocks):
            p = f"layer{s}.{i}"
            keys += [*bn(f"{p}.bn1"), f"{p}.conv1.weight", *bn(f"{p}.bn2"), f"{p}.prelu.weight",
                     f"{p}.conv2.weight", *bn(f"{p}.bn3")]
            if i == 0:
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    return keys + [*bn("bn2"), "fc.weight", "fc.bias", *bn("features")]


def meta_model(name: str, **kw) -> IResNet:
    with torch.device("meta"):  # structure only: no memory, no init cost
        return create_model(name, **kw)


@pytest.mark.parametrize("name", list(LAYERS))
def test_param_counts_and_keys_match_insightface(name):
    m = meta_model(name)
    n = sum(p.numel() for p in m.parameters())
    assert n == INSIGHTFACE_PARAMS[name] == closed_form_params(LAYERS[name])
    assert list(m.state_dict()) == insightface_keys(LAYERS[name])
    assert m.embedding_size == 512 and m.feature_channels == 512


def test_r50_is_43_6_million_and_shapes_match_insightface():
    m = meta_model("iresnet50")
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == 43.6
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["conv1.weight"] == (64, 3, 3, 3)
    assert shapes["prelu.weight"] == (64,)
    assert shapes["layer1.0.downsample.0.weight"] == (64, 64, 1, 1)
    assert shapes["layer2.0.conv1.weight"] == (128, 64, 3, 3)
    assert shapes["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["layer3.13.prelu.weight"] == (256,)
    assert shapes["layer4.2.bn3.running_var"] == (512,)
    assert shapes["fc.weight"] == (512, 512 * 7 * 7)
    assert shapes["features.weight"] == (512,)


def test_tiny_backbone_shapes_and_frozen_embedding_scale():
    torch.manual_seed(0)
    m = create_model("iresnet_tiny")
    assert sum(p.numel() for p in m.parameters()) == closed_form_params([1, 1, 1, 1], (8, 16, 32, 64), 64)
    x = torch.randn(3, 3, 112, 112)
    assert m.forward_features(x).shape == (3, m.feature_channels, 7, 7)
    emb = m(x)
    assert emb.shape == (3, m.embedding_size)
    # Training-mode BatchNorm1d with weight 1, bias 0: each embedding dimension is standardised.
    torch.testing.assert_close(emb.mean(0), torch.zeros(m.embedding_size), atol=1e-5, rtol=0)
    assert not m.features.weight.requires_grad
    assert torch.equal(m.features.weight, torch.ones(m.embedding_size))


def test_registry_lists_names_and_rejects_unknown():
    assert {"iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "iresnet_tiny"} <= set(list_models())
    with pytest.raises(ValueError, match=r"unknown model 'iresnet51'.*iresnet50.*iresnet_tiny"):
        create_model("iresnet51")
    assert create_model("iresnet_tiny", num_features=32, dropout=0.2).embedding_size == 32


def test_backbone_rejects_wrong_input_size():
    m = create_model("iresnet_tiny")
    with pytest.raises(ValueError, match=r"\(B, 3, 112, 112\).*\(2, 3, 96, 96\)"):
        m(torch.randn(2, 3, 96, 96))


@pytest.mark.parametrize("size, grid", [(48, 3), (64, 4), (112, 7)])
def test_input_size_sets_the_last_map_and_the_fc_layer(size, grid):
    m = create_model("iresnet_small", input_size=size).eval()
    assert m.fc.in_features == 256 * grid * grid
    x = torch.randn(2, 3, size, size)
    assert m.forward_features(x).shape == (2, 256, grid, grid)
    assert m(x).shape == (2, 256)
    with pytest.raises(ValueError, match=rf"\(B, 3, {size}, {size}\)"):
        m(torch.randn(2, 3, size + 16, size + 16))


def test_input_size_must_be_a_multiple_of_the_stride():
    with pytest.raises(ValueError, match="multiple of 16.*got 50"):
        create_model("iresnet_tiny", input_size=50)


def _trained_tiny(seed: int) -> IResNet:
    torch.manual_seed(seed)
    m = create_model("iresnet_tiny")
    m(torch.randn(4, 3, 112, 112))  # moves BN running stats off their init values
    return m.eval()


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_strict_save_load_round_trip(tmp_path):
    src = _trained_tiny(0)
    path = tmp_path / "backbone.pth"
    torch.save(src.state_dict(), path)
    dst = _trained_tiny(1)
    x = torch.randn(2, 3, 112, 112)
    assert not torch.allclose(src(x), dst(x))
    load_backbone_state(dst, path)
    _assert_same(src, dst)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_module_prefixed_and_wrapped_checkpoints_load(tmp_path):
    src = _trained_tiny(0)
    path = tmp_path / "ddp_backbone.pth"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)
    dst = load_backbone_state(_trained_tiny(2), path)
    _assert_same(src, dst)
    dst = load_backbone_state(_trained_tiny(3), {"backbone": src.state_dict(), "step": 7})
    _assert_same(src, dst)


def test_checkpoint_without_num_batches_tracked_loads(tmp_path):
    # Old insightface exports lack num_batches_tracked; BatchNorm fills it in under strict loading.
    src = _trained_tiny(0)
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    dst = load_backbone_state(_trained_tiny(1), state)
    for k, v in state.items():
        assert torch.equal(dst.state_dict()[k], v)


def test_mismatching_checkpoints_name_file_and_keys(tmp_path):
    path = tmp_path / "other_width.pth"
    torch.save(create_model("iresnet_tiny", num_features=32).state_dict(), path)
    with pytest.raises(ValueError, match=r"other_width\.pth.*shape mismatches: fc\.weight: checkpoint \(32, 3136\) "
                                         r"vs model \(64, 3136\)"):
        load_backbone_state(create_model("iresnet_tiny"), path)

    state = create_model("iresnet_tiny").state_dict()
    del state["layer1.0.bn3.weight"]
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: layer1\.0\.bn3\.weight.*unexpected keys: head\.weight"):
        load_backbone_state(create_model("iresnet_tiny"), state)

    deeper = tmp_path / "deeper.pth"  # one more block in stage 1 than iresnet_tiny
    torch.save(IResNet([2, 1, 1, 1], widths=(8, 16, 32, 64), num_features=64).state_dict(), deeper)
    with pytest.raises(ValueError, match=r"deeper\.pth.*unexpected keys: layer1\.1\."):
        load_backbone_state(create_model("iresnet_tiny"), deeper)

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_backbone_state(create_model("iresnet_tiny"), tmp_path / "nowhere.pth")


def test_embedding_layers_run_in_float32_under_autocast():
    net = create_model("iresnet_tiny").eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        emb = net(x)
        flat = torch.flatten(net.bn2(net.forward_features(x)), 1)
    assert emb.dtype == torch.float32  # not rounded to bf16 (insightface keeps fc / features in fp32)
    with torch.no_grad():
        torch.testing.assert_close(emb, net.features(net.fc(flat.float())))
