"""Space-Time U-Net (STUNet): a 2D text-to-image U-Net inflated to generate a whole clip in one pass.

Axes: b batch, c channels, t frames, h w height/width.

Inflation (Lumiere §3.1), added around the prior's unchanged spatial layers:
- after every spatial block of every level, a conv-based inflation block: a factorized (2+1)D layer whose
  "+1" is a temporal 1D conv (kernel 3) over each pixel's time series;
- after every spatial block of the coarsest level, an attention-based inflation block: temporal
  self-attention over all (compressed) frames;
- temporal downsampling next to every spatial downsampling (identity-initialised temporal conv, stride 2)
  and temporal upsampling next to every spatial upsampling (frame duplication, identity-initialised conv),
  so the coarsest level sees T / 2^K frames.
Every new block starts as the identity (or as nearest-neighbour resampling in time), so at initialisation the
STUNet reproduces the prior frame by frame on a static video; the prior's weights are frozen.

With `conditional=True` the first conv takes ⟨J, C, M⟩ (7 channels, see `conditioning.py`); it is a new,
trainable layer initialised from the prior's first conv with zero weights on the 4 condition channels, so the
conditional model starts as the unconditional one.

`temporal_resampling=False` keeps time at full resolution at every level: the fixed-temporal-resolution
video U-Net that the paper compares against, with the same width and depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .errors import FrameCountError
from .unet2d import Attention, UNet2D, zero_init

CONDITION_CHANNELS = 4  # C (3) + M (1)


@dataclass
class STUNetConfig:
    temporal_resampling: bool = True  # False: the fixed-temporal-resolution baseline
    temporal_attention: bool = True  # attention inflation blocks at the coarsest level
    temporal_head_dim: int = 32
    freeze_prior: bool = True  # train only the inflation / temporal layers
    # conditional: the input is ⟨J, C, M⟩ = noisy video (3) + masked condition video (3) + mask (1) = 7 channels
    # (Lumiere §4), one model for image-to-video, inpainting, cinemagraphs and extension
    conditional: bool = False
    # temporal_text: the conv inflation blocks also get the timestep + pooled-text embedding (a per-video bias,
    # as the prior's ResBlocks get it). Off in the paper's design, where the prompt reaches the temporal layers
    # only through the frozen prior's features; a small prior trained on single frames has no reason to encode
    # motion words there (benchmarks/RESULTS.md, quality_shapes)
    temporal_text: bool = False

    __pydantic_config__ = {"extra": "forbid"}


def identity_temporal_conv(channels: int, stride: int = 1) -> nn.Conv3d:
    """A kernel-3 conv over time only; centre tap = identity matrix, so it passes frames through unchanged."""
    conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(stride, 1, 1), padding=(1, 0, 0))
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 0, 0] = torch.eye(channels)
        conv.bias.zero_()
    return conv


class TemporalConvBlock(nn.Module):
    """Conv-based inflation: the "+1" of a (2+1)D layer; b c t h w -> b c t h w, identity at init.

    With `emb_dim`, the per-video embedding emb (b e) is added between the two convs (like a ResBlock's)."""

    def __init__(self, channels: int, groups: int, emb_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        self.emb_proj = nn.Linear(emb_dim, channels) if emb_dim else None
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = zero_init(nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))  # zero: identity

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb_proj is not None:
            h = h + rearrange(self.emb_proj(F.silu(emb)), "b c -> b c 1 1 1")
        return x + self.conv2(F.silu(self.norm2(h)))


def sinusoidal_positions(length: int, dim: int, device) -> torch.Tensor:
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=device) / dim)
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freqs)
    pe[:, 1::2] = torch.cos(pos * freqs[: dim // 2])
    return pe


class TemporalAttentionBlock(nn.Module):
    """Attention-based inflation: each pixel attends over all frames; b c t h w -> b c t h w, identity at init."""

    def __init__(self, channels: int, head_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attn = Attention(channels, None, head_dim)
        zero_init(self.attn.to_out)  # zero: the block starts as identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        seq = rearrange(x, "b c t h w -> (b h w) t c")
        q = self.norm(seq) + sinusoidal_positions(t, c, x.device).to(seq.dtype)
        seq = seq + self.attn(q)
        return rearrange(seq, "(b h w) t c -> b c t h w", b=b, h=h, w=w)


class TemporalDownsample(nn.Module):
    """Identity-initialised temporal conv with stride 2: at init, keeps every other frame."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = identity_temporal_conv(channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TemporalUpsample(nn.Module):
    """Frame duplication, then an identity-initialised temporal conv: at init, nearest-neighbour in time."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = identity_temporal_conv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(repeat(x, "b c t h w -> b c (t r) h w", r=2))


def _slot(key: str) -> str:
    return key.replace(".", "_")  # ModuleDict keys cannot contain dots


class STUNet(nn.Module):
    """(b c t h w, timesteps (b), context (b l d), pooled (b e)) -> b c t h w."""

    def __init__(self, prior: UNet2D, cfg: STUNetConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or STUNetConfig()
        self.prior = prior
        groups = prior.cfg.norm_groups
        channels = prior.block_channels()
        self.temporal_convs = nn.ModuleDict(
            {_slot(k): TemporalConvBlock(ch, groups, prior.emb_dim if cfg.temporal_text else None)
             for k, ch in channels.items()}
        )
        self.temporal_attns = nn.ModuleDict(
            {_slot(k): TemporalAttentionBlock(channels[k], cfg.temporal_head_dim) for k in prior.coarsest_keys()}
            if cfg.temporal_attention
            else {}
        )
        self.time_down = nn.ModuleDict()
        self.time_up = nn.ModuleDict()
        if cfg.temporal_resampling:
            for i, level in enumerate(prior.down):
                if level.resample is not None:
                    self.time_down[str(i)] = TemporalDownsample(level.resample.out_channels)
            for i, level in enumerate(prior.up):
                if level.resample is not None:
                    self.time_up[str(i)] = TemporalUpsample(level.resample.conv.out_channels)
        if cfg.conditional:
            prior_in = prior.conv_in
            self.conv_in = nn.Conv2d(prior_in.in_channels + CONDITION_CHANNELS, prior_in.out_channels, 3, padding=1)
            with torch.no_grad():  # the prior's filters on J, zero on ⟨C, M⟩: starts as the unconditional model
                self.conv_in.weight.zero_()
                self.conv_in.weight[:, : prior_in.in_channels] = prior_in.weight
                self.conv_in.bias.copy_(prior_in.bias)
        if cfg.freeze_prior:
            self.prior.requires_grad_(False)

    @property
    def in_channels(self) -> int:
        return self.conv_in.in_channels if self.cfg.conditional else self.prior.cfg.in_channels

    @property
    def temporal_factor(self) -> int:
        """How many times shorter the coarsest level is than the input clip."""
        return 2 ** len(self.time_down)

    def check_frames(self, frames: int) -> None:
        f = self.temporal_factor
        if frames < 1 or frames % f:
            k = len(self.time_down)
            lower, upper = max(f, frames - frames % f), frames - frames % f + f
            raise FrameCountError(
                f"the STUNet halves time {k} times, so the frame count must be a positive multiple of "
                f"2^{k} = {f}; got {frames} frames (use e.g. {lower} or {upper})"
            )

    def temporal_parameters(self):
        """The parameters inflation added (everything but the prior)."""
        return [p for n, p in self.named_parameters() if not n.startswith("prior.")]

    # --- inflation hooks called from inside UNet2D.forward; h is (b t) c h w ---
    def block(self, key: str, h: torch.Tensor, frames: int, emb: torch.Tensor) -> torch.Tensor:
        v = rearrange(h, "(b t) c h w -> b c t h w", t=frames)
        v = self.temporal_convs[_slot(key)](v, emb)
        if _slot(key) in self.temporal_attns:
            v = self.temporal_attns[_slot(key)](v)
        return rearrange(v, "b c t h w -> (b t) c h w")

    def _resample(self, layers: nn.ModuleDict, level: int, h: torch.Tensor, frames: int):
        if str(level) not in layers:
            return h, frames
        v = layers[str(level)](rearrange(h, "(b t) c h w -> b c t h w", t=frames))
        return rearrange(v, "b c t h w -> (b t) c h w"), v.shape[2]

    def down(self, level: int, h: torch.Tensor, frames: int):
        return self._resample(self.time_down, level, h, frames)

    def up(self, level: int, h: torch.Tensor, frames: int):
        return self._resample(self.time_up, level, h, frames)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"STUNet expects a video batch b c t h w, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            what = "⟨J, C, M⟩ (3 + 3 + 1)" if self.cfg.conditional else "an RGB video"
            raise ValueError(f"this STUNet takes {self.in_channels} input channels ({what}), got {x.shape[1]}")
        frames = x.shape[2]
        self.check_frames(frames)
        out = self.prior(
            rearrange(x, "b c t h w -> (b t) c h w"), timesteps, context, pooled, inflation=self, frames=frames,
            stem=self.conv_in if self.cfg.conditional else None,
        )
        return rearrange(out, "(b t) c h w -> b c t h w", t=frames)

    def coarsest_frames(self, frames: int) -> int:
        self.check_frames(frames)
        return frames // self.temporal_factor
