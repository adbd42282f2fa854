"""Space-Time U-Net (STUNet): a 2D text-to-image U-Net inflated to generate a whole clip in one pass.

Axes: b batch, c channels, t frames, h w height/width, l text tokens, d text width, e embedding width.

Inflation (Lumiere §3.1), added around the prior's unchanged spatial layers:
- after every spatial block of every level but the coarsest, a conv-based inflation block: a factorized
  space-time conv — its own trainable spatial conv (1×3×3) followed by a temporal conv (3×1×1) — with a
  residual around it and a zero-initialised output;
- after every spatial block of the coarsest level, an attention-based inflation block: temporal
  self-attention over all (compressed) frames, cross-attention to the prompt's tokens, a feed-forward;
- temporal downsampling next to every spatial downsampling (identity-initialised temporal conv, stride 2)
  and temporal upsampling next to every spatial upsampling (frame duplication, identity-initialised conv),
  so the coarsest level sees T / 2^K frames.
(`coarsest_attention: spacetime`, beyond the paper: the coarsest attention blocks attend over every position of
every compressed frame, not each pixel over its own frames.)

The motion layers have a conditioning path of their own (`MotionConditioning`, trainable): the timestep and a
learned projection of the frozen text encoder's tokens (attention-pooled to one vector, plus the pooled
embedding) give a per-video embedding that scales and shifts every conv inflation block's features; the
projected tokens are what the coarsest-level attention blocks cross-attend to. A prior trained on single
frames has no reason to encode "left" or "right" in its features, and a frozen random-init text encoder barely
separates those words (benchmarks/RESULTS.md), so the motion layers must be able to learn what the prompt says
about motion themselves.

Every new block starts as the identity (or as nearest-neighbour resampling in time), so at initialisation the
STUNet reproduces the prior frame by frame, on a static video and on a moving one; the prior's weights are
frozen by default.

With `conditional=True` the first conv takes ⟨J, C, M⟩ (7 channels, see `conditioning.py`); it is a new,
trainable layer initialised from the prior's first conv with zero weights on the 4 condition channels, so the
conditional model starts as the unconditional one.

`temporal_resampling=False` keeps time at full resolution at every level: the fixed-temporal-resolution
video U-Net that the paper compares against, with the same width and depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import FrameCountError
from .unet2d import Attention, UNet2D, timestep_embedding, zero_init

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
    # conv inflation block: "factorized" = trainable spatial 1×3×3 conv then temporal 3×1×1 conv (the paper's);
    # "temporal" = two temporal convs only (the earlier design, kept for the ablation in benchmarks/RESULTS.md)
    conv_block: Literal["factorized", "temporal"] = "factorized"
    # the motion layers' own trainable timestep + text conditioning (scale/shift in the conv blocks,
    # cross-attention to tokens in the coarsest attention blocks); False: they see the prompt only through the
    # prior's features, as in the paper
    motion_conditioning: bool = True
    # also a conv inflation block at the coarsest level, before its attention block (beyond the paper: with the
    # prior frozen, the attention blocks there mix no space, so nothing trainable can move content where the
    # whole compressed clip is seen at once). On in the small and base configs: with it the small STUNet's mid-clip
    # motion restarts went (98 % direction on two training seeds, 98 % / 57 % without: benchmarks/RESULTS.md runs X–Z)
    coarsest_conv: bool = False
    # what the coarsest level's attention blocks attend over: "temporal" (the paper's: each pixel over all frames)
    # or "spacetime" (every position of every frame of the compressed clip: t·h·w tokens). A shape that moved sits
    # at another pixel in a later frame, and per-pixel temporal attention cannot look there, only the spatial layers
    # around it can (beyond the paper; at 600 steps no gain over "temporal", benchmarks/RESULTS.md run AC). Cheap at
    # the coarsest level (16 frames at 32² → 4·8·8 = 256 tokens)
    coarsest_attention: Literal["temporal", "spacetime"] = "temporal"
    # space-time coordinates (x, y, t of the clip, each in [-1, 1]) as extra inputs of every conv inflation block's
    # spatial conv: "a shape moving right" is, at high noise, a blob whose position depends on the frame, and
    # convolutions alone cannot tell where in the frame or the clip they are. Measured (benchmarks/RESULTS.md,
    # run C): no gain in direction at 3,000 steps, so off; kept for the ablation
    coordinates: bool = False
    # how the motion conditioning pools the prompt's projected tokens into one vector: "attention" (one learned
    # query, softmax over positions) or "attention_max" (plus the max over positions of every feature). A motion
    # word is one token of sixteen: the softmax pool starts near-uniform and dilutes it ~1/16, the max passes a
    # feature that fires on it at full size, whatever the prompt's length (benchmarks/RESULTS.md, run Q). The small
    # and base configs set attention_max: with timestep_shift 3 it is what made direction learnable (runs R, S)
    motion_text_pool: Literal["attention", "attention_max"] = "attention"

    __pydantic_config__ = {"extra": "forbid"}


def identity_temporal_conv(channels: int, stride: int = 1) -> nn.Conv3d:
    """A kernel-3 conv over time only; centre tap = identity matrix, so it passes frames through unchanged."""
    conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(stride, 1, 1), padding=(1, 0, 0))
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 0, 0] = torch.eye(channels)
        conv.bias.zero_()
    return conv


class MotionConditioning(nn.Module):
    """The motion layers' conditioning: (timesteps b, tokens b l d, pooled b e) -> (emb b m, tokens b l m).

    The text encoder is frozen (and by default a random init); the projection of its tokens here is trained with
    the motion layers, so it can learn to separate prompts that differ only in a motion word. `pool`: see
    `STUNetConfig.motion_text_pool`."""

    def __init__(self, context_dim: int, pooled_dim: int, dim: int, time_freqs: int, pool: str = "attention"):
        super().__init__()
        if pool not in ("attention", "attention_max"):
            raise ValueError(f"stunet.motion_text_pool must be 'attention' or 'attention_max', got {pool!r}")
        self.time_freqs, self.pool = time_freqs, pool
        self.time_mlp = nn.Sequential(nn.Linear(time_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.token_proj = nn.Sequential(nn.LayerNorm(context_dim), nn.Linear(context_dim, dim), nn.SiLU(),
                                        nn.Linear(dim, dim))
        self.pool_query = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        self.pooled_proj = nn.Linear(pooled_dim, dim)
        self.text_mlp = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))

    def text(self, context: torch.Tensor, pooled: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled text embedding b m, projected tokens b l m): what the motion layers know of the prompt."""
        tokens = self.token_proj(context)
        weights = torch.softmax(tokens @ self.pool_query / math.sqrt(tokens.shape[-1]), dim=1)  # b l
        summary = torch.einsum("bl,blm->bm", weights, tokens)
        if self.pool == "attention_max":
            summary = summary + tokens.amax(dim=1)
        if pooled is not None:
            summary = summary + self.pooled_proj(pooled)
        return self.text_mlp(summary), tokens

    def forward(self, timesteps, context, pooled):
        text, tokens = self.text(context, pooled)
        return self.time_mlp(timestep_embedding(timesteps, self.time_freqs)) + text, tokens


def clip_coordinates(t: int, h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """(t 3 h w): each pixel's x, y and frame position in the clip, pixel and frame centres in [-1, 1]."""
    def axis(n):
        return (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n * 2 - 1

    tt, yy, xx = torch.meshgrid(axis(t), axis(h), axis(w), indexing="ij")
    return torch.stack((xx, yy, tt), dim=1).to(dtype)


class FactorizedConvBlock(nn.Module):
    """Conv-based inflation: spatial 1×3×3 conv, scale/shift from the motion embedding, temporal 3×1×1 conv;
    b c t h w -> b c t h w, identity at init (the temporal conv, the block's output, starts at zero).

    With `coordinates`, a 1×1 conv of the clip's (x, y, t) coordinates is added to the spatial conv's output, so the
    text's scale/shift can select features that say where a shape is in frame t for the prompted motion."""

    def __init__(self, channels: int, groups: int, emb_dim: int | None = None, coordinates: bool = False):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.spatial = nn.Conv2d(channels, channels, 3, padding=1)  # over (b t) images: Conv2d is the fast path
        self.coords = nn.Conv2d(3, channels, 1) if coordinates else None
        self.emb_proj = nn.Linear(emb_dim, 2 * channels) if emb_dim else None
        self.norm2 = nn.GroupNorm(groups, channels)
        self.temporal = zero_init(nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))  # zero: identity

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        t = x.shape[2]
        h = self.norm1(x)  # GroupNorm over c and (t h w): statistics of the whole clip
        h = rearrange(self.spatial(rearrange(F.silu(h), "b c t h w -> (b t) c h w")), "(b t) c h w -> b c t h w", t=t)
        if self.coords is not None:
            coords = self.coords(clip_coordinates(t, *x.shape[3:], device=x.device, dtype=x.dtype))  # t c h w
            h = h + rearrange(coords, "t c h w -> 1 c t h w")
        h = self.norm2(h)
        if self.emb_proj is not None:
            scale, shift = rearrange(self.emb_proj(F.silu(emb)), "b (two c) -> two b c 1 1 1", two=2)
            h = h * (1 + scale) + shift
        return x + self.temporal(F.silu(h))


class TemporalConvBlock(nn.Module):
    """Temporal-only conv inflation (`conv_block: temporal`, the ablation): two 3×1×1 convs; identity at init.

    With `emb_dim`, the motion embedding (b e) scales and shifts the features between the two convs."""

    def __init__(self, channels: int, groups: int, emb_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        self.emb_proj = nn.Linear(emb_dim, 2 * channels) if emb_dim else None
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = zero_init(nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))  # zero: identity

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if self.emb_proj is not None:
            scale, shift = rearrange(self.emb_proj(F.silu(emb)), "b (two c) -> two b c 1 1 1", two=2)
            h = h * (1 + scale) + shift
        return x + self.conv2(F.silu(h))


def sinusoidal_positions(length: int, dim: int, device) -> torch.Tensor:
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=device) / dim)
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freqs)
    pe[:, 1::2] = torch.cos(pos * freqs[: dim // 2])
    return pe


def spacetime_positions(t: int, h: int, w: int, dim: int, device) -> torch.Tensor:
    """((t h w) dim): sinusoidal codes of the frame, row and column, each in its own third of the channels (zeros in
    the rest): summed codes of one frequency set would alias, e.g. (frame 1, row 0) with (frame 0, row 1)."""
    part = dim // 6 * 2  # even: sin/cos pairs
    codes = [sinusoidal_positions(n, part, device) for n in (t, h, w)]
    pe = torch.cat([
        repeat(codes[0], "t d -> t h w d", h=h, w=w),
        repeat(codes[1], "h d -> t h w d", t=t, w=w),
        repeat(codes[2], "w d -> t h w d", t=t, h=h),
    ], dim=-1)
    return F.pad(rearrange(pe, "t h w d -> (t h w) d"), (0, dim - 3 * part))


class TemporalAttentionBlock(nn.Module):
    """Attention-based inflation: each pixel attends over all frames (with `spacetime`, over every position of every
    frame), then (with `context_dim`) to the prompt's tokens, then a feed-forward; b c t h w -> b c t h w, identity
    at init (every branch's output starts at zero)."""

    def __init__(self, channels: int, head_dim: int, context_dim: int | None = None, spacetime: bool = False):
        super().__init__()
        self.spacetime = spacetime
        self.norm = nn.LayerNorm(channels)
        self.attn = Attention(channels, None, head_dim)
        zero_init(self.attn.to_out)  # zero: the block starts as identity
        self.cross = None
        if context_dim:
            self.norm_cross = nn.LayerNorm(channels)
            self.cross = zero_init_out(Attention(channels, context_dim, head_dim))
        self.norm_ff = nn.LayerNorm(channels)
        self.ff = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(),
                                zero_init(nn.Linear(4 * channels, channels)))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.spacetime:
            seq = rearrange(x, "b c t h w -> b (t h w) c")
            q = self.norm(seq) + spacetime_positions(t, h, w, c, x.device).to(seq.dtype)
        else:
            seq = rearrange(x, "b c t h w -> (b h w) t c")
            q = self.norm(seq) + sinusoidal_positions(t, c, x.device).to(seq.dtype)
        seq = seq + self.attn(q)
        if self.cross is not None and tokens is not None:
            n = 1 if self.spacetime else h * w
            seq = seq + self.cross(self.norm_cross(seq), repeat(tokens, "b l m -> (b n) l m", n=n))
        seq = seq + self.ff(self.norm_ff(seq))
        if self.spacetime:
            return rearrange(seq, "b (t h w) c -> b c t h w", t=t, h=h, w=w)
        return rearrange(seq, "(b h w) t c -> b c t h w", b=b, h=h, w=w)


def zero_init_out(attn: Attention) -> Attention:
    zero_init(attn.to_out)
    return attn


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
        motion_dim = prior.emb_dim if cfg.motion_conditioning else None
        self.motion = (
            MotionConditioning(prior.cfg.context_dim, prior.cfg.pooled_dim, prior.emb_dim, prior.time_freqs,
                               cfg.motion_text_pool)
            if cfg.motion_conditioning else None
        )
        # the paper's layout: attention blocks at the coarsest level, conv blocks at every other level (and
        # everywhere when there are no attention blocks, e.g. the SSR, or with `coarsest_conv`)
        attn_keys = set(prior.coarsest_keys()) if cfg.temporal_attention else set()
        if cfg.coordinates and cfg.conv_block != "factorized":
            raise ValueError("stunet.coordinates needs stunet.conv_block: factorized (the temporal-only block has "
                             "no spatial conv to take them)")
        conv_block = (partial(FactorizedConvBlock, coordinates=cfg.coordinates) if cfg.conv_block == "factorized"
                      else TemporalConvBlock)
        self.temporal_convs = nn.ModuleDict(
            {_slot(k): conv_block(ch, groups, motion_dim)
             for k, ch in channels.items() if cfg.coarsest_conv or k not in attn_keys}
        )
        # in the U-Net's block order, not the set's: set order of strings changes with each process's hash seed,
        # and ranks that build their modules in different orders initialise and all-reduce them mismatched
        self.temporal_attns = nn.ModuleDict(
            {_slot(k): TemporalAttentionBlock(channels[k], cfg.temporal_head_dim, motion_dim,
                                              spacetime=cfg.coarsest_attention == "spacetime")
             for k in channels if k in attn_keys}
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
        motion_emb = motion_tokens = None
        if self.motion is not None:
            t = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(context.shape[0])
            motion_emb, motion_tokens = self.motion(t, context, pooled)
        out = self.prior(
            rearrange(x, "b c t h w -> (b t) c h w"), timesteps, context, pooled,
            inflation=_Hooks(self, motion_emb, motion_tokens), frames=frames,
            stem=self.conv_in if self.cfg.conditional else None,
        )
        return rearrange(out, "(b t) c h w -> b c t h w", t=frames)

    def coarsest_frames(self, frames: int) -> int:
        self.check_frames(frames)
        return frames // self.temporal_factor


class _Hooks:
    """The inflation hooks `UNet2D.forward` calls (`unet2d.Inflation`) for one STUNet call; h is (b t) c h w."""

    def __init__(self, stunet: STUNet, motion_emb: torch.Tensor | None, motion_tokens: torch.Tensor | None):
        self.stunet, self.motion_emb, self.motion_tokens = stunet, motion_emb, motion_tokens

    def block(self, key: str, h: torch.Tensor, frames: int, emb: torch.Tensor) -> torch.Tensor:
        slot, s = _slot(key), self.stunet
        v = rearrange(h, "(b t) c h w -> b c t h w", t=frames)
        # the temporal blocks hold most of a video model's activations: recomputed with the spatial ones
        ckpt = s.prior.checkpoints_activations()
        for layers, extra in ((s.temporal_convs, self.motion_emb), (s.temporal_attns, self.motion_tokens)):
            if slot in layers:
                v = checkpoint(layers[slot], v, extra, use_reentrant=False) if ckpt else layers[slot](v, extra)
        return rearrange(v, "b c t h w -> (b t) c h w")

    def _resample(self, layers: nn.ModuleDict, level: int, h: torch.Tensor, frames: int):
        if str(level) not in layers:
            return h, frames
        v = layers[str(level)](rearrange(h, "(b t) c h w -> b c t h w", t=frames))
        return rearrange(v, "b c t h w -> (b t) c h w"), v.shape[2]

    def down(self, level: int, h: torch.Tensor, frames: int):
        return self._resample(self.stunet.time_down, level, h, frames)

    def up(self, level: int, h: torch.Tensor, frames: int):
        return self._resample(self.stunet.time_up, level, h, frames)
