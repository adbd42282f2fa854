"""Text-to-video generation: text encoder + STUNet + sampler, from a checkpoint or a config.

Frames leave this module as uint8 `b t h w c`; inside they are float `b c t h w` in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from .checkpoint import build_stunet, load_model
from .config import LumiereConfig
from .diffusion import Conditioning, sample, sampling_scheduler
from .errors import LumiereError
from .stunet import STUNet
from .text_encoder import TextEncoder


@dataclass
class GenerationResult:
    videos: np.ndarray  # b t h w c uint8
    fps: float
    seed: int


class TextToVideo:
    """Generates clips from prompts with a STUNet (a t2i checkpoint is inflated: its frames are independent)."""

    def __init__(self, model: STUNet, text_encoder: TextEncoder, cfg: LumiereConfig, source: str):
        self.model = model.eval()
        self.text_encoder = text_encoder
        self.cfg = cfg
        self.source = source  # where the weights came from, for logs and API responses

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> TextToVideo:
        model, cfg, meta = load_model(path, use_ema=True, as_kind="stunet")
        encoder = TextEncoder(cfg.text)
        expected = meta.get("text_fingerprint")
        if expected and expected != encoder.fingerprint():
            raise LumiereError(
                f"checkpoint {path} was trained with a different text encoder (fingerprint {expected}, "
                f"this one {encoder.fingerprint()}); check the text.* config keys"
            )
        source = f"{path} ({meta['kind']}, step {meta.get('step', '?')})"
        return cls(model.to(device), encoder.to(device), cfg, source)

    @classmethod
    def random_init(cls, cfg: LumiereConfig, device: str = "cpu", seed: int = 0) -> TextToVideo:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_stunet(cfg)
        return cls(model.to(device), TextEncoder(cfg.text).to(device), cfg, f"random init ({cfg.name} config)")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: list[str]) -> Conditioning:
        context, pooled = self.text_encoder.encode_text(prompts)
        return Conditioning(context.to(self.device), pooled.to(self.device))

    def generate(
        self,
        prompts: list[str],
        *,
        frames: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int = 0,
        callback: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        cfg = self.cfg
        frames = frames or cfg.video.frames
        self.model.check_frames(frames)
        if not prompts:
            raise LumiereError("no prompt given")
        scheduler = sampling_scheduler(cfg.diffusion, sampler or cfg.sample.sampler, steps or cfg.sample.steps)
        generator = torch.Generator().manual_seed(seed)
        size = cfg.video.size
        noise = torch.randn((len(prompts), 3, frames, size, size), generator=generator).to(self.device)
        x = sample(
            self.model,
            noise,
            scheduler,
            self.encode(prompts),
            guidance_scale=cfg.sample.guidance_scale if guidance_scale is None else guidance_scale,
            generator=generator,
            callback=callback,
        )
        videos = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        return GenerationResult(rearrange(videos, "b c t h w -> b t h w c").numpy(), cfg.video.fps, seed)
