"""Configs: named YAMLs, overrides, and one-line errors that name the key."""

import pytest

from lumiere.config import available_configs, load_config
from lumiere.errors import ConfigError


def test_named_configs_load():
    assert {"tiny", "small", "base"} <= set(available_configs())
    for name in ("tiny", "small"):
        cfg = load_config(name)
        assert cfg.name == name
        assert (cfg.unet.context_dim, cfg.unet.pooled_dim) == cfg.text.dims()  # derived, never disagree
    base = load_config("base")
    assert base.video.frames == 80 and base.video.size == 128


def test_overrides_are_typed():
    cfg = load_config("tiny", ["unet.base_channels=16", "unet.channel_mult=[1,2,2]", "train.lr=1e-4",
                               "stunet.temporal_resampling=false"])
    assert cfg.unet.base_channels == 16 and cfg.unet.channel_mult == (1, 2, 2)
    assert cfg.train.lr == 1e-4 and cfg.stunet.temporal_resampling is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("unet.base_channels=abc", "unet.base_channels"),
        ("unet.bogus=1", "unknown key 'unet.bogus'"),
        ("nosuchsection.x=1", "unknown key 'nosuchsection'"),
        ("unet.base_channels=10", "divisible by norm_groups"),
        ("diffusion.prediction_type=x0", "diffusion.prediction_type"),
        ("video.size=33", "video.size=33 must be divisible"),
        ("no_equals_sign", "must look like key.path=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")) as info:
        load_config("tiny", [override])
    assert "\n" not in str(info.value)


def test_unknown_config_name():
    with pytest.raises(ConfigError, match="no config named 'huge'"):
        load_config("huge")
