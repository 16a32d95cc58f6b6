"""Typed configs: YAML in, overrides, validation errors that name the key, saved beside a run."""

from __future__ import annotations

import pytest
import yaml

from ranray.config import (ConfigError, PrepareConfig, TrainConfig, TuneConfig, flatten, load_config,
                           save_config)


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_fill_nested_dataclasses(tmp_path):
    path = write(tmp_path, "epochs: 3\nmodel:\n  backbone: iresnet_tiny\nloss:\n  rb_margin: 0.2\n")
    cfg = load_config(TrainConfig, path, ["optim.lr=0.01", "data.augment.flip=false", "optim.milestones=[0.5]"])
    assert cfg.epochs == 3
    assert cfg.model.backbone == "iresnet_tiny"
    assert cfg.loss.rb_margin == pytest.approx(0.2)
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.data.augment.flip is False
    assert cfg.optim.milestones == [0.5]
    assert cfg.model.num_regions == 6  # untouched default


def test_renamed_keys_still_load_with_a_warning(tmp_path, caplog):
    old = write(tmp_path, "model:\n  rb_margin: 0.2\ndata:\n  label_mode: crossentropy\n")
    cfg = load_config(TrainConfig, old, ["model.backbone=iresnet_tiny"])
    assert (cfg.loss.rb_margin, cfg.loss.label_mode) == (0.2, "crossentropy")
    assert "config key 'model.rb_margin' is now 'loss.rb_margin'" in caplog.text
    assert "config key 'data.label_mode' is now 'loss.label_mode'" in caplog.text
    assert load_config(TrainConfig, None, ["model.rb_margin=0.05"]).loss.rb_margin == 0.05
    with pytest.raises(ConfigError, match="'model.rb_margin' and 'loss.rb_margin' are both set"):
        load_config(TrainConfig, old, ["loss.rb_margin=0.3"])
    saved = yaml.safe_load(save_config(cfg, tmp_path / "saved.yaml").read_text())
    assert "rb_margin" not in saved["model"] and "label_mode" not in saved["data"]  # written under the new names


def test_a_removed_key_still_loads_with_a_warning(caplog):
    cfg = load_config(PrepareConfig, None, ["out=x", "inputs=[a.csv]", "batch_size=8"])
    assert not hasattr(cfg, "batch_size")
    assert "config key 'batch_size' is no longer used" in caplog.text


def test_int_is_accepted_for_float_and_kept_as_float():
    cfg = load_config(TrainConfig, None, ["optim.lr=1"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0


@pytest.mark.parametrize("override, key", [
    ("model.bogus=1", "model.bogus"),
    ("nonsense=1", "nonsense"),
    ("data.augment.blur=0.1", "data.augment.blur"),
])
def test_unknown_key_is_refused_by_name(override, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(TrainConfig, None, [override])


@pytest.mark.parametrize("override, key", [
    ("epochs=many", "epochs"),
    ("epochs=true", "epochs"),
    ("optim.milestones=0.5", "optim.milestones"),
    ("precision=fp8", "precision"),
    ("model.region_mode=spiral", "model.region_mode"),
])
def test_wrong_type_or_choice_is_refused_by_name(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(TrainConfig, None, [override])


@pytest.mark.parametrize("override, key", [
    ("epochs=0", "epochs"),
    ("model.num_regions=1", "model.num_regions"),
    ("model.crop_frac=0", "model.crop_frac"),
    ("loss.rb_margin=-0.1", "loss.rb_margin"),
    ("loss.share_entropy=-0.1", "loss.share_entropy"),
    ("model.region_dropout=1", "model.region_dropout"),
    ("optim.milestones=[1.5]", "optim.milestones"),
    ("precision=fp16", "precision"),  # fp16 without a GPU
    ("log_every_n_steps=0", "log_every_n_steps"),
    ("max_steps=-1", "max_steps"),
    ("run.hooks=[step_hooks]", "run.hooks"),  # not module:factory
])
def test_validation_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(TrainConfig, None, [override])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TrainConfig, None, ["epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(TrainConfig, write(tmp_path, "- a\n- b\n"))


def test_tune_space_ranges_are_validated():
    with pytest.raises(ConfigError, match="space.margin_min"):
        load_config(TuneConfig, None, ["space.margin_min=0.5", "space.margin_max=0.1"])
    with pytest.raises(ConfigError, match="space.lr_min"):
        load_config(TuneConfig, None, ["space.lr_min=0"])


def test_prepare_requires_out_and_inputs():
    with pytest.raises(ConfigError, match="'out'"):
        load_config(PrepareConfig, None, ["inputs=[a.csv]"])
    with pytest.raises(ConfigError, match="subset_lists.sideways"):
        load_config(PrepareConfig, None, ["out=x", "inputs=[a]", "subset_lists={sideways: f.txt}"])


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(TrainConfig, None, ["epochs=7", "model.backbone=iresnet18", "run.name=abc"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert not list(path.parent.glob("*.tmp"))
    assert load_config(TrainConfig, path) == cfg
    assert yaml.safe_load(path.read_text())["model"]["backbone"] == "iresnet18"


def test_flatten_gives_dotted_scalars():
    flat = flatten(TrainConfig())
    assert flat["loss.rb_margin"] is None and flat["loss.rb_space"] == "softmax"  # null: the dataset's margin
    assert flat["data.augment.erase_prob"] == 0.25
    assert all(not isinstance(v, dict) for v in flat.values())



def test_registry_choices_come_from_the_registry_itself(monkeypatch):
    """A key chosen from a registry (config.one_of) accepts exactly the registry's keys (+ its extra
    values such as "auto"): adding an optimiser to OPTIMIZERS makes it a valid optim.name."""
    from ranray.train import optim

    with pytest.raises(ConfigError, match=r"'optim.name' must be one of \['sgd', 'adamw'\], got 'lion'"):
        load_config(TrainConfig, None, ["optim.name=lion"])
    monkeypatch.setitem(optim.OPTIMIZERS, "lion", optim.OPTIMIZERS["sgd"])
    assert load_config(TrainConfig, None, ["optim.name=lion"]).optim.name == "lion"
    assert load_config(TrainConfig, None, ["precision=auto"]).precision == "auto"  # an extra value


def test_importing_the_config_imports_no_registry():
    import subprocess
    import sys

    code = ("import sys, ranray.config; "
            "print(sorted(m for m in ('torch', 'ranray.models.ran', 'ranray.train.optim') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
