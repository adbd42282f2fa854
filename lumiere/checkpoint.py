"""Building models from a config, and saving/loading checkpoints.

A checkpoint is a directory:
    config.yaml          the full LumiereConfig the model was built from
    meta.json            {"kind": "t2i" | "stunet" | "ssr", "step": N, "text_fingerprint": ..., "format": 1}
    model.safetensors    the model's weights (for a STUNet: prior.* and the temporal layers)
    ema.safetensors      EMA weights, same keys (used for sampling)
    train_state.pt       optimizer / LR-scheduler / step, loaded with torch.load(weights_only=True)
Weights are safetensors and the training state is loaded with `weights_only=True`: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LumiereConfig, build_config
from .errors import LumiereError
from .stunet import STUNet
from .unet2d import UNet2D

FORMAT = 1
KINDS = ("t2i", "stunet", "ssr")


def build_prior(cfg: LumiereConfig) -> UNet2D:
    return UNet2D(cfg.unet)


def build_stunet(cfg: LumiereConfig, prior: UNet2D | None = None) -> STUNet:
    """Inflate `prior` (or a freshly initialised prior) into a STUNet; new layers start as identity."""
    return STUNet(prior if prior is not None else build_prior(cfg), cfg.stunet)


def build_ssr(cfg: LumiereConfig) -> STUNet:
    """The inflated super-resolution U-Net (see ssr.py): 6 input channels, every weight trainable."""
    return STUNet(UNet2D(cfg.ssr.unet_config(cfg.unet.context_dim, cfg.unet.pooled_dim)), cfg.ssr.stunet_config())


def build_model(cfg: LumiereConfig, kind: str) -> nn.Module:
    if kind == "t2i":
        return build_prior(cfg)
    if kind == "stunet":
        return build_stunet(cfg)
    if kind == "ssr":
        return build_ssr(cfg)
    raise LumiereError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    cfg: LumiereConfig,
    kind: str,
    *,
    step: int = 0,
    ema_state: dict[str, torch.Tensor] | None = None,
    train_state: dict[str, Any] | None = None,
    extra_meta: dict[str, Any] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (a temp dir renamed into place). `model_state`: the full weights
    when `model` is sharded (gathered by the caller), instead of `model.state_dict()`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(_contiguous(model_state if model_state is not None else model.state_dict()),
                  tmp / "model.safetensors")
        if ema_state is not None:
            save_file(_contiguous(ema_state), tmp / "ema.safetensors")
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        meta = {"kind": kind, "step": step, "format": FORMAT, **(extra_meta or {})}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: str | os.PathLike, options=None) -> tuple[LumiereConfig, dict[str, Any]]:
    """(config, meta) of a checkpoint directory, local or an s3:// one (read in place: two small files; `options`:
    lumiere.storage.StorageOptions, default from the environment)."""
    if str(path).startswith("s3://"):
        from . import storage

        uri = str(path).rstrip("/")
        if not storage.exists(storage.join(uri, "meta.json"), options) or not storage.exists(
                storage.join(uri, "model.safetensors"), options):
            raise LumiereError(f"{uri} is not a Lumiere checkpoint (expected meta.json and model.safetensors in it)")
        meta = json.loads(storage.read_bytes(storage.join(uri, "meta.json"), options))
        return build_config(yaml.safe_load(storage.read_bytes(storage.join(uri, "config.yaml"), options))), meta
    path = Path(path)
    if not (path / "meta.json").exists() or not (path / "model.safetensors").exists():
        raise LumiereError(
            f"{path} is not a Lumiere checkpoint (expected meta.json and model.safetensors in it)"
        )
    meta = json.loads((path / "meta.json").read_text())
    cfg = build_config(yaml.safe_load((path / "config.yaml").read_text()))
    return cfg, meta


def load_weights(model: nn.Module, path: Path, use_ema: bool = True, may_miss: tuple[str, ...] = ()) -> None:
    """Load a checkpoint's (EMA) weights; keys starting with a `may_miss` prefix keep their initial values
    (e.g. the conditional STUNet's `conv_in.`, initialised from the prior, when starting from an unconditional one)."""
    file = path / "ema.safetensors" if use_ema and (path / "ema.safetensors").exists() else path / "model.safetensors"
    state = load_file(file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(may_miss)] if may_miss else missing
    if missing or unexpected:
        raise LumiereError(
            f"checkpoint {path} does not match the model built from its config "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[:2]})"
        )


def load_model(path: str | os.PathLike, use_ema: bool = True, as_kind: str | None = None):
    """Load a checkpoint as (model, cfg, meta). `as_kind="stunet"` inflates a t2i checkpoint."""
    path = Path(path)
    cfg, meta = read_meta(path)
    kind = meta["kind"]
    model = build_model(cfg, kind)
    load_weights(model, path, use_ema)
    if as_kind == "stunet" and kind == "t2i":
        model = build_stunet(cfg, model)
    elif as_kind is not None and as_kind != kind:
        raise LumiereError(f"cannot load a {kind} checkpoint as {as_kind}")
    return model.eval(), cfg, meta


def load_train_state(path: str | os.PathLike) -> dict[str, Any] | None:
    file = Path(path) / "train_state.pt"
    return torch.load(file, map_location="cpu", weights_only=True) if file.exists() else None
