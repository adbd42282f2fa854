"""Stylized generation (Lumiere §4): fine-tune the T2I prior on style reference images, then generate with
the prior's weights interpolated towards the style, W = α·W_style + (1 − α)·W_orig, temporal layers untouched.

Because the STUNet's prior is frozen while its temporal layers train, the temporal layers still match a prior
that was moved a little towards a style; α (0.5–1 recommended) trades style strength against motion quality.

A style is a directory:
    style.safetensors   the fine-tuned prior's weights (the same keys as a t2i checkpoint)
    meta.json           {"format": 1, "base_fingerprint": ..., "prompt": ..., "steps": ..., "images": N, ...}
`base_fingerprint` identifies the prior the style was fitted from; applying it to another prior is an error.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from safetensors.torch import load_file, save_file

from .diffusion import Conditioning, diffusion_loss, training_scheduler
from .errors import LumiereError
from .stunet import STUNet
from .unet2d import UNet2D

FORMAT = 1


def prior_fingerprint(prior: UNet2D) -> str:
    """A short hash of the prior's weights: which base model a style belongs to."""
    h = hashlib.sha256()
    for name, tensor in sorted(prior.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _augment(images: torch.Tensor, batch: int, g: torch.Generator) -> torch.Tensor:
    """Random picks with horizontal flips and mild random crops: n c h w -> batch c h w."""
    n, _, h, w = images.shape
    idx = torch.randint(0, n, (batch,), generator=g)
    out = images[idx].clone()
    flip = torch.rand(batch, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    crop = int(h * 0.875)
    for i in range(batch):  # a random 87.5 % crop resized back: the style, not the exact picture
        y, x = (int(torch.randint(0, h - crop + 1, (1,), generator=g)) for _ in range(2))
        out[i] = torch.nn.functional.interpolate(out[i : i + 1, :, y : y + crop, x : x + crop], size=(h, w),
                                                 mode="bilinear", align_corners=False)[0]
    return out


def fit_style(prior: UNet2D, images: np.ndarray, cond: Conditioning, diffusion_cfg, *, steps: int = 100,
              lr: float = 2e-4, batch_size: int = 4, seed: int = 0,
              callback: Callable[[int, float], None] | None = None) -> dict[str, torch.Tensor]:
    """Fine-tune a copy of `prior` on style images (n h w c uint8, already at the model's size) for `steps`
    steps with the text condition `cond` (one prompt, b=1); returns the fine-tuned prior's state dict."""
    if steps < 1:
        raise LumiereError(f"--steps must be >= 1, got {steps}")
    model = copy.deepcopy(prior).train().requires_grad_(True)
    device = next(model.parameters()).device
    x = rearrange(torch.from_numpy(np.ascontiguousarray(images)).float(), "n h w c -> n c h w") / 127.5 - 1.0
    x = x.to(device)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = training_scheduler(diffusion_cfg)
    for step in range(steps):
        batch = _augment(x, batch_size, g)
        c = Conditioning(cond.context.expand(batch_size, -1, -1), cond.pooled.expand(batch_size, -1))
        loss = diffusion_loss(model, batch, c, sched, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if callback is not None:
            callback(step + 1, float(loss.detach()))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_style(path: str | os.PathLike, state: dict[str, torch.Tensor], meta: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "style.safetensors")
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_style(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not (path / "style.safetensors").exists() or not (path / "meta.json").exists():
        raise LumiereError(f"{path} is not a style directory (expected style.safetensors and meta.json; "
                           "make one with `lumiere style fit`)")
    return load_file(path / "style.safetensors"), json.loads((path / "meta.json").read_text())


def interpolate_prior(stunet: STUNet, style_state: dict[str, torch.Tensor], alpha: float,
                      base_fingerprint: str | None = None) -> STUNet:
    """A copy of `stunet` whose prior weights are α·W_style + (1 − α)·W_orig; every other weight is shared
    unchanged. α=0 gives the original prior exactly, α=1 the style weights exactly (torch.lerp's endpoints)."""
    if not 0.0 <= alpha <= 1.0:
        raise LumiereError(f"style strength must be in [0, 1] (0.5–1 recommended), got {alpha}")
    if base_fingerprint is not None and base_fingerprint != prior_fingerprint(stunet.prior):
        raise LumiereError("this style was fitted from another base model (its prior differs); fit it again "
                           "with `lumiere style fit --checkpoint <this checkpoint>`")
    prior_state = stunet.prior.state_dict()
    if set(style_state) != set(prior_state) or any(style_state[k].shape != v.shape for k, v in prior_state.items()):
        raise LumiereError("the style's weights do not match this model's prior (another config); fit it again")
    styled_prior = copy.deepcopy(stunet.prior)
    with torch.no_grad():
        styled_prior.load_state_dict({
            k: torch.lerp(v, style_state[k].to(v), alpha) if v.is_floating_point() else v
            for k, v in prior_state.items()
        })
    styled = copy.copy(stunet)  # shallow: the temporal layers are the very same modules
    styled._modules = dict(stunet._modules)
    styled._modules["prior"] = styled_prior
    return styled
