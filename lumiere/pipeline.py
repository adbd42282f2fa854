"""Generation: text encoder + STUNet + sampler for every task, and the SSR upsampler with MultiDiffusion.

Frames enter and leave this module as uint8 `t h w c` / `b t h w c` (images `h w c`, masks `h w` or `t h w`);
inside they are float `b c t h w` in [-1, 1].

Tasks (`TextToVideo.generate(task=...)`):
    t2v          text to video
    i2v          `image` becomes frame 0, the rest is generated                      (conditional model)
    inpaint      `video` with a `mask` region (white = fill) regenerated               (conditional model)
    cinemagraph  `image` with a `mask` region (white = animate) animated, the rest still (conditional model)
    extend       continue `video`: its last `context_frames` frames condition the next clip (conditional model)
    v2v          SDEdit: `video` noised to `strength` and denoised with the prompt (any model)
Every task can use a `style` (see style.py) at `style_strength` α. Inputs of another size are center-cropped and
resized (each adaptation is reported in `GenerationResult.notes`); inputs with too few frames, or a mask that
does not match its image, are rejected with a `LumiereError` saying which.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from .checkpoint import build_ssr, build_stunet, load_model
from .conditioning import (
    cinemagraph_condition,
    composite,
    extend_condition,
    i2v_condition,
    inpaint_condition,
    t2v_condition,
)
from .config import LumiereConfig
from .diffusion import Conditioning, noise_to_strength, sample, sampling_scheduler
from .errors import LumiereError
from .multidiffusion import MultiDiffusion
from .ssr import upsample_condition
from .stunet import STUNet
from .text_encoder import TextEncoder
from .video import fit_frames

TASKS = ("t2v", "i2v", "inpaint", "cinemagraph", "v2v", "extend")
CONDITIONAL_TASKS = ("i2v", "inpaint", "cinemagraph", "extend")
NEEDS = {  # task -> the inputs it requires
    "t2v": (), "i2v": ("image",), "inpaint": ("video", "mask"), "cinemagraph": ("image", "mask"),
    "v2v": ("video",), "extend": ("video",),
}
DEFAULT_STRENGTH = 0.6


@dataclass
class GenerationResult:
    videos: np.ndarray  # b t h w c uint8
    fps: float
    seed: int | list[int]
    notes: list[str] = field(default_factory=list)  # how inputs were adapted (resized, trimmed)


def _to_model(frames: np.ndarray) -> torch.Tensor:
    """t h w c uint8 -> 1 c t h w float in [-1, 1]."""
    return rearrange(torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0, "t h w c -> 1 c t h w")


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """b c t h w in [-1, 1] -> b t h w c uint8."""
    videos = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return rearrange(videos, "b c t h w -> b t h w c").numpy()


def _check_pixels(array, what: str, ndims: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim not in ndims or a.size == 0:
        raise LumiereError(f"the {what} has shape {a.shape}; expected {' or '.join(f'{n}-D' for n in ndims)} pixels")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        raise LumiereError(f"the {what} must be uint8 pixels, got {a.dtype}")
    return a


class TextToVideo:
    """Generates clips from prompts with a STUNet (a t2i checkpoint is inflated: its frames are independent)."""

    def __init__(self, model: STUNet, text_encoder: TextEncoder, cfg: LumiereConfig, source: str,
                 style_cache_size: int = 4):
        self.model = model.eval()
        self.text_encoder = text_encoder
        self.cfg = cfg
        self.source = source  # where the weights came from, for logs and API responses
        # each entry is a full copy of the model: least recently used first out, so memory stays bounded
        self._styled: OrderedDict[tuple[str, float], STUNet] = OrderedDict()
        self.style_cache_size = max(0, int(style_cache_size))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> TextToVideo:
        model, cfg, meta = load_model(path, use_ema=True, as_kind="stunet")
        encoder = _checked_encoder(cfg, meta, path)
        source = f"{path} ({meta['kind']}{', conditional' if cfg.stunet.conditional else ''}, " \
                 f"step {meta.get('step', '?')})"
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

    @property
    def conditional(self) -> bool:
        return bool(self.model.cfg.conditional)

    def encode(self, prompts: list[str]) -> Conditioning:
        context, pooled = self.text_encoder.encode_text(prompts)
        return Conditioning(context.to(self.device), pooled.to(self.device))

    def styled(self, style: str | Path, strength: float) -> STUNet:
        """The model with its prior interpolated towards `style` (an LRU cache of `style_cache_size` per style and
        strength)."""
        from .style import interpolate_prior, load_style

        key = (str(style), float(strength))
        if key in self._styled:
            self._styled.move_to_end(key)
            return self._styled[key]
        state, meta = load_style(style)
        model = interpolate_prior(self.model, state, strength, meta.get("base_fingerprint")).eval()
        if self.style_cache_size:
            self._styled[key] = model
            while len(self._styled) > self.style_cache_size:
                self._styled.popitem(last=False)
        return model

    # --- inputs -----------------------------------------------------------------------------------------
    def _image(self, image, notes: list[str]) -> np.ndarray:
        image = _check_pixels(image, "image", (3,))
        if image.shape[-1] != 3:
            raise LumiereError(f"the image must be RGB (h, w, 3), got shape {image.shape}")
        size = self.cfg.video.size
        if image.shape[:2] != (size, size):
            notes.append(f"image center-cropped and resized from {image.shape[1]}x{image.shape[0]} to {size}x{size}")
        return fit_frames(image[None], size)[0]

    def _video(self, video, need: int, task: str, notes: list[str], keep: str = "first") -> np.ndarray:
        video = _check_pixels(video, "video", (4,))
        if video.shape[-1] != 3:
            raise LumiereError(f"the video must be RGB frames (t, h, w, 3), got shape {video.shape}")
        t, size = len(video), self.cfg.video.size
        if t < need:
            raise LumiereError(f"the input video has {t} frames; task {task} needs at least {need} "
                               f"(the model's clip length is {self.cfg.video.frames})")
        if t > need and keep == "first":
            notes.append(f"input video trimmed from {t} to its first {need} frames (the model's clip length)")
            video = video[:need]
        if video.shape[1:3] != (size, size):
            notes.append(f"video center-cropped and resized from {video.shape[2]}x{video.shape[1]} to {size}x{size}")
        return fit_frames(video, size)

    def _region(self, mask, like_shape: tuple[int, int], frames: int | None, notes: list[str]) -> torch.Tensor:
        """A user mask (h w or t h w; nonzero/white = the region) matched to its input -> 1 (t) h w in {0, 1}."""
        mask = _check_pixels(mask, "mask", (2, 3) if frames else (2,))
        if mask.shape[-2:] != tuple(like_shape):
            raise LumiereError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but its input is "
                               f"{like_shape[1]}x{like_shape[0]}; they must be the same size")
        if mask.ndim == 3:
            if len(mask) < frames:
                raise LumiereError(f"the mask has {len(mask)} frames; the clip has {frames} (give one mask image "
                                   "for every frame, or a single 2-D mask for all)")
            mask = mask[:frames]
        fitted = fit_frames(mask if mask.ndim == 3 else mask[None], self.cfg.video.size, nearest=True)
        region = torch.from_numpy((fitted > 127).astype(np.float32))
        if not region.any():
            notes.append("the mask marks no region: nothing is regenerated or animated")
        return region if mask.ndim == 3 else region[0]

    # --- generation ---------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[str],
        *,
        task: str = "t2v",
        image: np.ndarray | None = None,
        video: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        strength: float | None = None,
        style: str | Path | None = None,
        style_strength: float = 1.0,
        context_frames: int | None = None,
        frames: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int | list[int] = 0,
        callback: Callable[[int, int], None] | None = None,
        negative_prompt: str | None = None,
    ) -> GenerationResult:
        """`seed`: one for the batch, or one per prompt (each sample's starting noise drawn from its own seed, so a
        prompt batched with others starts from the same noise as alone; with a deterministic sampler (ddim,
        dpmsolver++) its video is then the same up to float rounding)."""
        cfg = self.cfg
        if task not in TASKS:
            raise LumiereError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        if not prompts:
            raise LumiereError("no prompt given")
        given = {"image": image is not None, "video": video is not None, "mask": mask is not None}
        missing = [k for k in NEEDS[task] if not given[k]]
        if missing:
            raise LumiereError(f"task {task} needs {' and '.join(missing)}")
        unused = [k for k, v in given.items() if v and k not in NEEDS[task]]
        if unused:
            raise LumiereError(f"task {task} does not take {' or '.join(unused)}; tasks that do: "
                               + ", ".join(t for t in TASKS if set(unused) <= set(NEEDS[t])))
        if task in CONDITIONAL_TASKS and not self.conditional:
            raise LumiereError(f"task {task} needs a conditional model (7 input channels); this one ({self.source}) "
                               "is not: fine-tune one with `lumiere train stunet --conditional`")
        if strength is not None and task != "v2v":
            raise LumiereError(f"strength applies to task v2v only, not {task}")
        frames = frames or cfg.video.frames
        self.model.check_frames(frames)
        b, size, notes = len(prompts), cfg.video.size, []
        scheduler = sampling_scheduler(cfg.diffusion, sampler or cfg.sample.sampler, steps or cfg.sample.steps)
        seeds = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(x) for x in seed]
        if len(seeds) not in (1, b):
            raise LumiereError(f"give one seed, or one per prompt ({b}); got {len(seeds)}")
        generator = torch.Generator().manual_seed(seeds[0])
        if len(seeds) == 1:
            noise = torch.randn((b, 3, frames, size, size), generator=generator)
        else:
            noise = torch.cat([torch.randn((1, 3, frames, size, size), generator=torch.Generator().manual_seed(x))
                               for x in seeds])
        cm, start, prefix, k = None, 0, None, 0
        if task == "t2v" and self.conditional:
            cm = t2v_condition(1, frames, size, size)
        elif task == "i2v":
            cm = i2v_condition(_to_model(self._image(image, notes)[None])[:, :, 0], frames)
        elif task == "inpaint":
            clip = self._video(video, frames, task, notes)
            region = self._region(mask, np.asarray(video).shape[1:3], frames, notes)
            cm = inpaint_condition(_to_model(clip), region[None])
        elif task == "cinemagraph":
            region = self._region(mask, np.asarray(image).shape[:2], None, notes)
            cm = cinemagraph_condition(_to_model(self._image(image, notes)[None])[:, :, 0], region[None], frames)
        elif task == "extend":
            k = context_frames or max(1, frames // 4)
            if not 0 < k < frames:
                raise LumiereError(f"context_frames must be in 1..{frames - 1} for {frames}-frame clips, got {k}")
            clip = self._video(video, k, task, notes, keep="all")
            prefix = clip
            cm = extend_condition(_to_model(clip[-k:]), frames)
        elif task == "v2v":
            strength = DEFAULT_STRENGTH if strength is None else strength
            if not 0.0 < strength <= 1.0:
                raise LumiereError(f"strength must be in (0, 1] (small keeps the input, 1 ignores it), got {strength}")
            x0 = _to_model(self._video(video, frames, task, notes)).expand(b, -1, -1, -1, -1)
            if self.conditional:
                cm = t2v_condition(1, frames, size, size)
            noise, start = noise_to_strength(scheduler, x0, strength, generator)
        model = self.styled(style, style_strength) if style is not None else self.model
        if cm is not None:
            cm = cm.expand(b, -1, -1, -1, -1).to(self.device)
        if start >= len(scheduler.timesteps):
            x = noise.to(self.device)  # strength below one sampling step: the input itself
        else:
            x = sample(
                model,
                noise.to(self.device),
                scheduler,
                self.encode(prompts),
                guidance_scale=cfg.sample.guidance_scale if guidance_scale is None else guidance_scale,
                generator=generator,
                callback=callback,
                condition=cm,
                uncond=self.encode([negative_prompt] * len(prompts)) if negative_prompt else None,
                start_step=start,
                known=(cm[:, :3], cm[:, 3:]) if cm is not None and task in CONDITIONAL_TASKS
                and cfg.sample.replace_known else None,
            )
        if cm is not None:
            x = composite(x, cm)  # known pixels exactly as given
        videos = _to_uint8(x)
        if prefix is not None:  # extension: the input clip, then the frames after its last k
            videos = np.concatenate([np.broadcast_to(prefix, (b, *prefix.shape)), videos[:, k:]], axis=1)
        return GenerationResult(np.ascontiguousarray(videos), cfg.video.fps, seed, notes)


class Upsampler:
    """The SSR: upsample base-model clips by `ssr.scale` with MultiDiffusion over temporal windows."""

    def __init__(self, model: STUNet, text_encoder: TextEncoder, cfg: LumiereConfig, source: str):
        self.model = model.eval()
        self.text_encoder = text_encoder
        self.cfg = cfg
        self.source = source

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> Upsampler:
        model, cfg, meta = load_model(path, use_ema=True)
        if meta["kind"] != "ssr":
            raise LumiereError(f"{path} is a {meta['kind']} checkpoint; the upsampler needs an ssr one "
                               "(`lumiere train ssr`)")
        encoder = _checked_encoder(cfg, meta, path)
        return cls(model.to(device), encoder.to(device), cfg, f"{path} (ssr, step {meta.get('step', '?')})")

    @classmethod
    def random_init(cls, cfg: LumiereConfig, device: str = "cpu", seed: int = 0) -> Upsampler:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_ssr(cfg)
        return cls(model.to(device), TextEncoder(cfg.text).to(device), cfg, f"random init ({cfg.name} ssr)")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def denoiser(self, window: int | None = None, overlap: int | None = None,
                 weighting: str | None = None) -> MultiDiffusion:
        s = self.cfg.ssr
        return MultiDiffusion(self.model, window or s.window, s.overlap if overlap is None else overlap,
                              weighting or s.weighting)

    def upsample(
        self,
        videos: np.ndarray,
        prompts: list[str],
        *,
        steps: int | None = None,
        sampler: str | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        window: int | None = None,
        overlap: int | None = None,
        weighting: str | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        """videos b t h w c uint8 at the base size -> b t (h·s) (w·s) c."""
        cfg, s = self.cfg, self.cfg.ssr
        videos = np.asarray(videos)
        if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
            raise LumiereError(f"upsample takes uint8 videos (b, t, h, w, 3), got {videos.shape} {videos.dtype}")
        if len(prompts) != len(videos):
            raise LumiereError(f"{len(videos)} videos but {len(prompts)} prompts")
        notes, size = [], cfg.video.size
        if videos.shape[2:4] != (size, size):
            notes.append(f"input resized from {videos.shape[3]}x{videos.shape[2]} to the SSR input size {size}x{size}")
            videos = np.stack([fit_frames(v, size) for v in videos])
        lr = torch.cat([_to_model(v) for v in videos]).to(self.device)
        up = upsample_condition(lr, s.scale)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(up.shape, generator=generator).to(self.device)
        context, pooled = self.text_encoder.encode_text(prompts)
        x = sample(
            self.denoiser(window, overlap, weighting),
            noise,
            sampling_scheduler(cfg.diffusion, sampler or cfg.sample.sampler, steps or s.steps),
            Conditioning(context.to(self.device), pooled.to(self.device)),
            guidance_scale=s.guidance_scale if guidance_scale is None else guidance_scale,
            generator=generator,
            callback=callback,
            condition=up,
        )
        return GenerationResult(_to_uint8(x), cfg.video.fps, seed, notes)


def _checked_encoder(cfg: LumiereConfig, meta: dict, path) -> TextEncoder:
    encoder = TextEncoder(cfg.text)
    expected = meta.get("text_fingerprint")
    if expected and expected != encoder.fingerprint():
        raise LumiereError(
            f"checkpoint {path} was trained with a different text encoder (fingerprint {expected}, "
            f"this one {encoder.fingerprint()}); check the text.* config keys"
        )
    return encoder
