"""Spatial super-resolution (SSR): an inflated super-resolution U-Net, run over time with MultiDiffusion.

Axes: b batch, c channels, t frames, h w height/width (of the high-resolution video unless said otherwise).

The SSR is a 2D U-Net whose input is the noisy high-resolution frame (3 channels) concatenated with the
low-resolution frame upsampled bilinearly to the same size (3 channels), inflated like the base model
(`stunet.STUNet`: factorized space-time conv blocks after every spatial block; by default without temporal
down/up-sampling or attention, as it sees short windows, and without the motion layers' own text path: the
low-resolution video carries the motion). It trains on random temporal windows of the high-resolution copies
ingestion keeps, the low-resolution input made by downsampling them (`degrade`), so the pair always matches.
At generation it runs over the whole clip with `multidiffusion.MultiDiffusion` (window length and overlap from
this config).
Unlike the paper's SSR, which inflates a pretrained image SR model, ours is trained from scratch: every weight
trains (`freeze_prior=False`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange

from .stunet import STUNetConfig
from .unet2d import UNetConfig


@dataclass
class SSRConfig:
    scale: int = 2  # output size = video.size × scale
    base_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = ()  # full-resolution attention is costly; text enters via pooled + coarse
    head_dim: int = 16
    norm_groups: int = 8
    temporal_resampling: bool = False
    temporal_attention: bool = False
    window: int = 8  # MultiDiffusion window length (frames); also the training clip length
    overlap: int = 2  # frames shared by consecutive windows (paper: 2)
    weighting: Literal["uniform", "ramp"] = "uniform"
    steps: int = 20
    guidance_scale: float = 1.0  # the low-resolution video carries the content; text guidance is optional

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        if not 0 <= self.overlap < self.window:
            raise ValueError(f"overlap must be in 0..window-1 (window={self.window}), got {self.overlap}")
        factor = 2 ** (len(self.channel_mult) - 1) if self.temporal_resampling else 1
        if self.window % factor:
            raise ValueError(f"window={self.window} must be a multiple of {factor} (temporal downsampling)")

    def unet_config(self, context_dim: int, pooled_dim: int) -> UNetConfig:
        return UNetConfig(
            in_channels=6, out_channels=3, base_channels=self.base_channels, channel_mult=self.channel_mult,
            num_res_blocks=self.num_res_blocks, attention_levels=self.attention_levels, head_dim=self.head_dim,
            norm_groups=self.norm_groups, context_dim=context_dim, pooled_dim=pooled_dim,
        )

    def stunet_config(self) -> STUNetConfig:
        return STUNetConfig(temporal_resampling=self.temporal_resampling,
                            temporal_attention=self.temporal_attention, temporal_head_dim=self.head_dim,
                            freeze_prior=False, motion_conditioning=False)


def degrade(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """High-res b c t h w -> low-res b c t h/s w/s (area average: what a lower-resolution camera records)."""
    if scale == 1:
        return hr
    t = hr.shape[2]
    lr = F.avg_pool2d(rearrange(hr, "b c t h w -> (b t) c h w"), scale)
    return rearrange(lr, "(b t) c h w -> b c t h w", t=t)


def upsample_condition(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """Low-res b c t h w -> the SSR's condition channels: bilinear upsampling by `scale`, b c t (h s) (w s)."""
    if scale == 1:
        return lr
    t = lr.shape[2]
    up = F.interpolate(rearrange(lr, "b c t h w -> (b t) c h w"), scale_factor=scale, mode="bilinear",
                       align_corners=False)
    return rearrange(up, "(b t) c h w -> b c t h w", t=t)
