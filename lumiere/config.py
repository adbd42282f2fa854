"""Configs: named YAML files (`lumiere/configs/<name>.yaml`) validated by pydantic, with `key.path=value`
overrides from the command line.

The model sections are the plain dataclasses that live next to each model (`UNetConfig` in unet2d.py, …), so
the model modules import with torch + einops alone; pydantic validates YAML into them and rejects unknown keys.
Every problem is a `ConfigError` whose one-line message names the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .conditioning import CONDITION_TYPES
from .diffusion import DiffusionConfig
from .errors import ConfigError
from .ssr import SSRConfig
from .stunet import STUNetConfig
from .text_encoder import TextEncoderConfig
from .unet2d import UNetConfig

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class VideoConfig:
    frames: int = 16  # clip length the STUNet generates
    size: int = 32  # square base resolution (pixels)
    fps: float = 16.0

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self):
        if self.frames < 1 or self.size < 8 or self.fps <= 0:
            raise ValueError("frames must be >= 1, size >= 8 and fps > 0")


@dataclass
class TrainConfig:
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    max_steps: int = 1000
    # after the warm-up, cosine: decay from the peak to 10 % over the rest of the run; wsd (warm-up, stable,
    # decay): hold the peak, then the same cosine down to 10 % over the last `lr_decay_fraction` of the steps
    lr_schedule: Literal["cosine", "wsd"] = "cosine"
    lr_decay_fraction: float = 0.2
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    log_every: int = 25
    seed: int = 0
    # samples per worker per optimizer step are `batch_size`, run as `grad_accum` micro-batches of
    # batch_size / grad_accum: memory falls with grad_accum while the global batch (and the data plan a resume
    # continues) stays batch_size × workers, so grad_accum may differ between a run and its resume
    grad_accum: int = 1
    # ddp: full weights, optimizer and EMA on every rank; fsdp: FSDP2 `fully_shard`, weights/grads/optimizer/EMA
    # sharded over the ranks (checkpoints: full weights for serving + a resharding torch.distributed.checkpoint)
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    # recompute every spatial and temporal block's activations in the backward pass instead of keeping them
    activation_checkpointing: bool = False
    # keep freed host memory mapped in a training worker (glibc malloc settings, `lumiere/allocator.py`): a CPU step
    # otherwise maps and zero-fills its activations' pages again every step (~39,000 page faults per `small`
    # STUNet step, benchmarks/RESULTS.md "The host allocator"); the worker keeps its peak heap mapped instead
    retain_host_memory: bool = True
    # conditional STUNet: the condition types sampled in training (conditioning.CONDITION_TYPES)
    condition_types: tuple[str, ...] = ("none", "first_frame", "prefix_frames", "spatiotemporal_box", "cinemagraph")

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self):
        if self.batch_size < 1 or self.max_steps < 0 or self.lr <= 0:
            raise ValueError("batch_size must be >= 1, max_steps >= 0 and lr > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("ema_decay must be in [0, 1)")
        if not 0.0 < self.lr_decay_fraction <= 1.0:
            raise ValueError(f"lr_decay_fraction must be in (0, 1] (the share of the steps the wsd schedule "
                             f"decays over); got {self.lr_decay_fraction}")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum must be >= 1 and divide batch_size ({self.batch_size}) into equal "
                             f"micro-batches; got {self.grad_accum}")
        self.condition_types = tuple(self.condition_types)
        unknown = set(self.condition_types) - set(CONDITION_TYPES)
        if unknown or not self.condition_types:
            raise ValueError(f"condition_types must be a non-empty list from {', '.join(CONDITION_TYPES)}; "
                             f"unknown: {', '.join(sorted(unknown))}")


@dataclass
class SampleConfig:
    sampler: Literal["ddim", "dpmsolver++", "ddpm"] = "ddim"
    steps: int = 30
    guidance_scale: float = 3.0
    # conditional tasks: also replace the known pixels of every intermediate sample (RePaint-style), on top of
    # the ⟨C, M⟩ conditioning, so known content stays exact and its neighbours see it at the right noise level
    replace_known: bool = True

    __pydantic_config__ = {"extra": "forbid"}


class LumiereConfig(BaseModel):
    """Everything a run needs: the prior's U-Net, its inflation, the text encoder, diffusion, data and loops."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    unet: UNetConfig = Field(default_factory=UNetConfig)
    stunet: STUNetConfig = Field(default_factory=STUNetConfig)
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    ssr: SSRConfig = Field(default_factory=SSRConfig)

    @model_validator(mode="after")
    def _derive(self):
        # the U-Net's conditioning widths are the text encoder's: derived, so they can never disagree
        self.unet.context_dim, self.unet.pooled_dim = self.text.dims()
        factor = 2 ** self.unet.num_downsamples
        if self.video.size % factor:
            raise ValueError(
                f"video.size={self.video.size} must be divisible by 2^{self.unet.num_downsamples} = {factor} "
                "(the U-Net halves the resolution at each level)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"]) or "<root>"
    msg = e["msg"].removeprefix("Value error, ")
    got = f" (got {e['input']!r})" if e["type"] not in ("missing",) and not isinstance(e["input"], dict) else ""
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"config error: unknown key '{key}'; check the spelling against `lumiere config show`"
    return f"config error: {key}: {msg}{got}{more}"


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for i, k in enumerate(keys[:-1]):
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config error: '{'.'.join(keys[: i + 1])}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'unet.base_channels=32' -> ('unet.base_channels', 32); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"config error: override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"config error: override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config_dict(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"config error: no config named {name_or_path!r}; use one of {', '.join(available_configs())} "
                "or a path to a .yaml file"
            )
    data = read_yaml_mapping(path)
    data.setdefault("name", path.stem)
    return data


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping; any problem is a one-line ConfigError naming the file."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config error: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path} must be a mapping of keys")
    return data


def build_config(data: dict[str, Any], overrides: list[str] | None = None) -> LumiereConfig:
    data = dict(data)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(data, key, value)
    try:
        return LumiereConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def load_config(name_or_path: str = "tiny", overrides: list[str] | None = None) -> LumiereConfig:
    """A named config (tiny, small, base, …) or a YAML path, with `key.path=value` overrides applied."""
    return build_config(load_config_dict(name_or_path), overrides)
