"""Text-conditioned pixel-space 2D U-Net: the text-to-image prior that Lumiere inflates into a STUNet.

Axes: b batch, c channels, h w height/width, l text tokens, d text width, e embedding width.

The forward pass is written once, as a walk over the levels, with three hooks (`block`, `down`, `up`) that a
space-time wrapper (`stunet.STUNet`) fills with temporal layers. Without hooks it is a plain image U-Net.
Images inside the walk are `(b f) c h w`: with `frames=f > 1` every frame of a video is an image of the batch,
and the per-video conditioning (timestep, text) is repeated over the frames of the current level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (1, 2)  # levels (0 = full resolution) with self/cross-attention
    head_dim: int = 32
    norm_groups: int = 8
    dropout: float = 0.0
    context_dim: int = 64  # width of the text encoder's token features
    pooled_dim: int = 64  # width of the text encoder's pooled embedding
    gradient_checkpointing: bool = False  # older name of train.activation_checkpointing (kept: old configs)

    __pydantic_config__ = {"extra": "forbid"}  # read by pydantic when it validates YAML into this dataclass

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        if not self.channel_mult:
            raise ValueError("channel_mult must list at least one level")
        for m in self.channel_mult:
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError(
                    f"every level's width (base_channels × channel_mult = {self.base_channels}×{m}) must be "
                    f"divisible by norm_groups={self.norm_groups}"
                )
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range 0..{len(self.channel_mult) - 1}")

    @property
    def num_downsamples(self) -> int:
        return len(self.channel_mult) - 1


class Inflation(Protocol):
    """Hooks a space-time wrapper puts into the 2D walk; `frames` is the clip length at the current level and
    `emb` (b e) the per-video timestep + pooled-text embedding the spatial blocks get."""

    def block(self, key: str, h: torch.Tensor, frames: int, emb: torch.Tensor) -> torch.Tensor: ...
    def down(self, level: int, h: torch.Tensor, frames: int) -> tuple[torch.Tensor, int]: ...
    def up(self, level: int, h: torch.Tensor, frames: int) -> tuple[torch.Tensor, int]: ...


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (b,) -> (b dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Attention(nn.Module):
    """Multi-head attention of x (b n c) over itself or over a context (b l d)."""

    def __init__(self, dim: int, context_dim: int | None = None, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, dim // head_dim)
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (
            rearrange(t, "b n (h d) -> b h n d", h=self.heads)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class SpatialTransformer(nn.Module):
    """Self-attention over pixels, cross-attention to text tokens, feed-forward; b c h w -> b c h w."""

    def __init__(self, channels: int, context_dim: int, head_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.ln_self, self.self_attn = nn.LayerNorm(channels), Attention(channels, None, head_dim)
        self.ln_cross, self.cross_attn = nn.LayerNorm(channels), Attention(channels, context_dim, head_dim)
        self.ln_ff = nn.LayerNorm(channels)
        self.ff = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))  # zero: the block starts as identity

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        height = x.shape[-2]
        h = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")
        h = h + self.self_attn(self.ln_self(h))
        h = h + self.cross_attn(self.ln_cross(h), context)
        h = h + self.ff(self.ln_ff(h))
        return x + self.proj_out(rearrange(h, "b (h w) c -> b c h w", h=height))


class ResBlock(nn.Module):
    """Two 3×3 convs with the timestep/text embedding as a scale-shift in between; b c h w -> b c' h w."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))  # zero: residual branch starts off
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = rearrange(self.emb_proj(F.silu(emb)), "b (two c) -> two b c 1 1", two=2)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SpatialBlock(nn.Module):
    """A ResBlock, optionally followed by a SpatialTransformer: the unit after which inflation hooks run."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, emb_dim: int, attention: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, cfg.norm_groups, cfg.dropout)
        self.attn = (
            SpatialTransformer(out_ch, cfg.context_dim, cfg.head_dim, cfg.norm_groups) if attention else None
        )
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x, context) if self.attn is not None else x


class Level(nn.Module):
    def __init__(self, blocks: list[SpatialBlock], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet2D(nn.Module):
    """ε/v-predicting U-Net over images: (b c h w, timesteps (b), context (b l d), pooled (b e)) -> b c h w."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.emb_dim = emb_dim = 4 * cfg.base_channels  # the per-video timestep + pooled-text embedding
        self.time_freqs = max(64, cfg.base_channels)  # enough frequencies to resolve 1000 timesteps
        self.time_embed = nn.Sequential(
            nn.Linear(self.time_freqs, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.pooled_proj = nn.Linear(cfg.pooled_dim, emb_dim)  # global text embedding joins the timestep
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)

        skip_ch, ch = [widths[0]], widths[0]
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(SpatialBlock(ch, width, cfg, emb_dim, i in cfg.attention_levels))
                ch = width
                skip_ch.append(ch)
            last = i == len(widths) - 1
            self.down.append(Level(blocks, None if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1)))
            if not last:
                skip_ch.append(ch)
        self.mid = nn.ModuleList(
            [SpatialBlock(ch, ch, cfg, emb_dim, attention=True), SpatialBlock(ch, ch, cfg, emb_dim, False)]
        )
        self.up = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(SpatialBlock(ch + skip_ch.pop(), width, cfg, emb_dim, i in cfg.attention_levels))
                ch = width
            self.up.append(Level(blocks, Upsample(ch) if i > 0 else None))
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch)
        self.conv_out = zero_init(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))  # zero: predicts 0 at init

    def block_channels(self) -> dict[str, int]:
        """Output width of every spatial block, by the key the inflation hooks receive."""
        out = {}
        for i, level in enumerate(self.down):
            out.update({f"down.{i}.{j}": b.out_channels for j, b in enumerate(level.blocks)})
        out.update({f"mid.{j}": b.out_channels for j, b in enumerate(self.mid)})
        for i, level in enumerate(self.up):
            out.update({f"up.{i}.{j}": b.out_channels for j, b in enumerate(level.blocks)})
        return out

    def coarsest_keys(self) -> list[str]:
        """Blocks at the lowest resolution: the last encoder level, the middle, the first decoder level."""
        last = len(self.down) - 1
        return (
            [f"down.{last}.{j}" for j in range(len(self.down[last].blocks))]
            + [f"mid.{j}" for j in range(len(self.mid))]
            + [f"up.0.{j}" for j in range(len(self.up[0].blocks))]
        )

    def embed(self, timesteps: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.time_freqs))
        if pooled is not None:
            emb = emb + self.pooled_proj(pooled)
        return emb

    activation_checkpointing = False  # set for training (train.activation_checkpointing); not part of the weights

    def checkpoints_activations(self) -> bool:
        """Whether blocks recompute their activations in backward (also the STUNet's temporal blocks)."""
        wanted = self.cfg.gradient_checkpointing or self.activation_checkpointing
        return wanted and self.training and torch.is_grad_enabled()

    def _run_block(self, block: SpatialBlock, h, emb, context):
        if self.checkpoints_activations():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor | None = None,
        *,
        inflation: Inflation | None = None,
        frames: int = 1,
        stem: nn.Module | None = None,
    ) -> torch.Tensor:
        """x: (b f) c h w; timesteps (b,) or scalar; context b l d; pooled b e. Returns (b f) c h w.

        `stem` replaces `conv_in` (the conditional STUNet's wider first conv takes ⟨J, C, M⟩)."""
        batch = context.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(batch)
        emb = self.embed(timesteps, pooled)
        per_frames: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def cond(f: int):  # per-video conditioning repeated over the f frames of the current level
            if f not in per_frames:
                per_frames[f] = (
                    repeat(emb, "b e -> (b f) e", f=f),
                    repeat(context, "b l d -> (b f) l d", f=f),
                )
            return per_frames[f]

        def after(key: str, h: torch.Tensor) -> torch.Tensor:
            return inflation.block(key, h, frames, emb) if inflation is not None else h

        h = (stem if stem is not None else self.conv_in)(x)
        skips = [h]
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.blocks):
                h = after(f"down.{i}.{j}", self._run_block(block, h, *cond(frames)))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                if inflation is not None:
                    h, frames = inflation.down(i, h, frames)
                skips.append(h)
        for j, block in enumerate(self.mid):
            h = after(f"mid.{j}", self._run_block(block, h, *cond(frames)))
        for i, level in enumerate(self.up):
            for j, block in enumerate(level.blocks):
                h = torch.cat([h, skips.pop()], dim=1)
                h = after(f"up.{i}.{j}", self._run_block(block, h, *cond(frames)))
            if level.resample is not None:
                h = level.resample(h)
                if inflation is not None:
                    h, frames = inflation.up(i, h, frames)
        return self.conv_out(F.silu(self.norm_out(h)))
