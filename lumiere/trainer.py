"""The training step shared by every model (t2i prior, STUNet, conditional STUNet, SSR), torchtitan-style.

What differs between models is passed in, not branched on: the model (a UNet2D or a STUNet), and how a batch
of clips becomes the model's target and condition (`model_input(kind, cfg)`: a random frame per clip for the 2D
prior; the whole clip for the STUNet; the clip with a random ⟨C, M⟩ condition for the conditional STUNet; the
high-resolution window with its degraded, re-upsampled copy for the SSR). Optimisation is the same for all:
AdamW on the parameters that require grad (the STUNet's prior is frozen, so it is not even in the optimizer),
linear warm-up then cosine decay to 10 % of the peak, over the whole run or (`train.lr_schedule: wsd`) its last
part only (`lr_lambda`: diffusers' `get_scheduler("cosine")` decays to 0, so it is not the same schedule and
checkpoints' LambdaLR state is kept), gradient clipping, an EMA of the
trained weights (diffusers' `EMAModel`), classifier-free-guidance text dropout.

Axes: b batch, c channels, t frames, h w height/width, l text tokens, d text width, e pooled width.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn

from .conditioning import composite, random_training_condition
from .config import LumiereConfig
from .diffusion import Conditioning, diffusion_loss, draw_noise, drop_conditioning, training_scheduler
from .parallel import full_state, full_tensor, is_sharded, load_sharded, save_sharded, set_gradient_sync
from .ssr import degrade, upsample_condition

ModelInput = tuple[torch.Tensor, torch.Tensor | None]  # (x0 the denoising target, condition channels or None)


def random_frames(clips: torch.Tensor, generator: torch.Generator | None = None) -> ModelInput:
    """One random frame per clip: b c t h w -> b c h w (how the 2D prior trains on video shards)."""
    b, _, t = clips.shape[:3]
    idx = torch.randint(0, t, (b,), generator=generator, device="cpu").to(clips.device)
    picked = clips[torch.arange(b, device=clips.device), :, idx]
    return picked, None


def whole_clip(clips: torch.Tensor, generator: torch.Generator | None = None) -> ModelInput:
    return clips, None


def conditioned_clip(types: tuple[str, ...]) -> Callable[..., ModelInput]:
    """The conditional STUNet: a random condition type per clip (conditioning.random_training_condition)."""

    def f(clips: torch.Tensor, generator: torch.Generator | None = None) -> ModelInput:
        cm = random_training_condition(clips, generator or torch.Generator(), types)
        return composite(clips, cm), cm

    return f


def ssr_window(scale: int) -> Callable[..., ModelInput]:
    """The SSR: high-res clips (already a random window) -> target, bilinear-upsampled low-res condition."""

    def f(clips: torch.Tensor, generator: torch.Generator | None = None) -> ModelInput:
        return clips, upsample_condition(degrade(clips, scale), scale)

    return f


def model_input(kind: str, cfg: LumiereConfig) -> Callable[..., ModelInput]:
    if kind == "t2i":
        return random_frames
    if kind == "stunet":
        return conditioned_clip(cfg.train.condition_types) if cfg.stunet.conditional else whole_clip
    if kind == "ssr":
        return ssr_window(cfg.ssr.scale)
    raise ValueError(f"unknown model kind {kind!r}")


class EMA:
    """Exponential moving average of the trainable parameters (frozen ones are their own average), by name.

    The averaging is diffusers' `EMAModel` (decay min(decay, (1 + k) / (10 + k)) at update k: a short warm-up so
    early checkpoints are usable); this class keeps the shadow weights addressable by parameter name, which is how
    checkpoints (`ema.safetensors`), FSDP's sharded checkpoint and `load_shadow` store them."""

    def __init__(self, model: nn.Module, decay: float):
        from diffusers.training_utils import EMAModel

        self.decay = decay
        names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
        # foreach=False: the per-tensor update also runs on FSDP's DTensor shards
        self.average = EMAModel(params, decay=decay, foreach=False)
        self.shadow = dict(zip(names, self.average.shadow_params, strict=True))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step `step` (0-based); the decay follows the step, so a resumed
        run continues the same warm-up."""
        self.average.optimization_step = step
        self.average.step([p for n, p in model.named_parameters() if n in self.shadow])

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's full state dict with the trained entries replaced by their averages."""
        state = dict(model.state_dict())
        state.update(self.shadow)
        return state

    def load_shadow(self, state: dict[str, torch.Tensor]) -> None:
        for n in self.shadow:
            if n in state:
                self.shadow[n].copy_(state[n])


def lr_lambda(warmup: int, total: int, schedule: str = "cosine", decay_fraction: float = 1.0
              ) -> Callable[[int], float]:
    """The LR multiplier at a step: linear warm-up, then a cosine down to 10 % of the peak, which starts right after
    the warm-up ("cosine") or holds the peak until the last `decay_fraction` of the steps ("wsd": warm-up, stable,
    decay). A short run ends its decay either way, so runs of any length compare at the same final LR; wsd keeps
    the peak LR for longer, which a model that must first escape a plateau spends on learning."""
    if schedule not in ("cosine", "wsd"):
        raise ValueError(f"unknown lr schedule {schedule!r}: use cosine or wsd")
    decay_start = warmup if schedule == "cosine" else max(warmup, total - round(decay_fraction * total))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = max(0.0, step - decay_start) / max(1, total - decay_start)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # cosine down to 10 %

    return f


def rank_seed(seed: int, rank: int) -> int:
    """A generator seed of its own for each data-parallel rank (`seed + rank` would make rank 1 of seed 0 draw
    what rank 0 of seed 1 draws); rank 0 keeps `seed` itself."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


class TrainStep:
    """Owns optimizer, LR schedule, EMA and noise schedule for one model; `__call__` does one step.

    The random numbers of a step (noise, timesteps, CFG text dropout, frame choice, condition type) come from a
    generator seeded per data-parallel `rank`: with one seed for all, every rank would draw the same timesteps
    and noise and the gang would see far fewer distinct samples than its global batch. `state_dict` holds this
    rank's generator; `gather_generators` / `load_state_dict(rank=...)` carry every rank's through a
    checkpoint that one rank writes."""

    def __init__(self, model: nn.Module, cfg: LumiereConfig, kind: str, forward: nn.Module | None = None,
                 amp_dtype: torch.dtype | None = None, rank: int = 0):
        self.model = model  # the module whose weights are saved
        self.forward = model if forward is None else forward  # what is called (e.g. a DDP wrapper of `model`)
        self.amp_dtype = amp_dtype  # e.g. torch.bfloat16 on GPU: autocast for the forward pass
        self.cfg = cfg
        self.kind, self.to_input = kind, model_input(kind, cfg)
        top = cfg.diffusion.top_noise_steps
        if kind == "stunet" and rank == 0 and top >= cfg.train.max_steps > 0:
            warnings.warn(f"diffusion.top_noise_steps ({top}) >= train.max_steps ({cfg.train.max_steps}): this STUNet "
                          "run trains only at the noisy end of the schedule, never where details are made; set "
                          "diffusion.top_noise_steps well below train.max_steps (e.g. 0 for a short run)", stacklevel=2)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.lr_schedule,
                                      cfg.train.lr_decay_fraction)
        )
        self.ema = EMA(model, cfg.train.ema_decay)
        self.noise_schedule = training_scheduler(cfg.diffusion)
        self.rank = rank
        self.generator = torch.Generator().manual_seed(rank_seed(cfg.train.seed, rank))
        self.step = 0

    def __call__(self, clips: torch.Tensor, cond: Conditioning) -> dict[str, float]:
        """One optimizer step on clips: b c t h w in [-1, 1], with text features for each clip.

        The step's random numbers are drawn for the whole batch first, in the same order whatever
        `train.grad_accum` is; the batch then runs as grad_accum equal micro-batches whose losses are weighted by
        their share of the batch, so the accumulated gradient is the whole batch's (up to float rounding), and
        only the last micro-batch's backward synchronises gradients across ranks."""
        t0 = time.perf_counter()
        self.model.train()
        x0, condition = self.to_input(clips, self.generator)
        cond = drop_conditioning(cond, self.cfg.diffusion.cond_dropout, self.generator)
        d = self.cfg.diffusion
        top = d.top_noise_fraction if self.kind == "stunet" and self.step < d.top_noise_steps else None
        noise, t = draw_noise(x0, self.noise_schedule, self.generator, d.timestep_shift, top)
        b, micro = x0.shape[0], max(1, x0.shape[0] // self.cfg.train.grad_accum)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for start in range(0, b, micro):
            part = slice(start, start + micro)
            with set_gradient_sync(self.forward, self.model, sync=start + micro >= b), torch.autocast(
                    x0.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                loss = diffusion_loss(
                    self.forward, x0[part], Conditioning(cond.context[part], cond.pooled[part]),
                    self.noise_schedule, condition=None if condition is None else condition[part],
                    noise_and_t=(noise[part], t[part]), motion_weight=self.cfg.diffusion.motion_loss_weight,
                ) * (x0[part].shape[0] / b)
                loss.backward()
            total += float(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.cfg.train.grad_clip
        )
        self.optimizer.step()
        self.lr_schedule.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        elapsed = time.perf_counter() - t0
        return {
            "loss": total,
            "grad_norm": float(full_tensor(grad_norm)),  # a DTensor under FSDP: its value over all shards
            "lr": self.optimizer.param_groups[0]["lr"],
            "step_time_s": elapsed,
            "samples_per_s": b / elapsed,
        }

    def full_ema_state(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The model's full state dict with the trained entries replaced by their EMA, on the CPU (what a
        checkpoint or a sample render stores). Under FSDP it is gathered: every rank must call it, and ranks that
        do not write pass keep=False."""
        return full_state(self.ema.state_dict(self.model), keep)

    def full_model_state(self, keep: bool = True) -> dict[str, torch.Tensor]:
        return full_state(self.model.state_dict(), keep)

    def save_shards(self, directory: Path) -> None:
        """FSDP: this rank's shard of the optimizer state and EMA into `directory` (a collective; no-op for DDP,
        whose optimizer state is in `state_dict`)."""
        if is_sharded(self.model):
            save_sharded(directory, self.model, self.optimizer, self.ema.shadow)

    def load_shards(self, directory: Path) -> None:
        if is_sharded(self.model):
            load_sharded(directory, self.model, self.optimizer, self.ema.shadow)

    def state_dict(self, generators: list[torch.Tensor] | None = None) -> dict:
        """`generators`: every rank's generator state, by rank (from `gather_generators`); default: this rank's."""
        return {
            # FSDP: the optimizer state is sharded and saved by every rank (`save_sharded`), not here
            **({} if is_sharded(self.model) else {"optimizer": self.optimizer.state_dict()}),
            "lr_schedule": self.lr_schedule.state_dict(),
            "step": self.step,
            "generator": self.generator.get_state(),  # the writer's own (checkpoints from before per-rank RNG)
            "generators": generators if generators is not None else [self.generator.get_state()],
            "generator_ranks": len(generators) if generators is not None else 1,
        }

    def gather_generators(self) -> list[torch.Tensor]:
        """Every rank's generator state, by rank; a collective when torch.distributed is initialised (call it on
        every rank), else just this one's."""
        import torch.distributed as dist

        mine = self.generator.get_state()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [mine]
        states: list = [None] * dist.get_world_size()
        dist.all_gather_object(states, mine)
        return states

    def load_state_dict(self, state: dict, ema_state: dict[str, torch.Tensor] | None = None) -> str:
        """Restore; this rank takes its own generator state when the checkpoint has one for it, and otherwise
        (another worker count) a fresh per-rank seed advanced by the step, so no two ranks draw alike.
        Returns how the generator was restored."""
        if "optimizer" in state:  # (under FSDP: `load_sharded`)
            self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.step = int(state["step"])
        generators = state.get("generators")
        if generators is not None and self.rank < len(generators):
            self.generator.set_state(generators[self.rank])
            how = f"rank {self.rank}'s own generator state"
        elif generators is None and self.rank == 0:
            self.generator.set_state(state["generator"])
            how = "the checkpoint's single generator state"
        else:
            seed = rank_seed(self.cfg.train.seed, self.rank) + 1_000_003 * self.step
            self.generator.manual_seed(seed % 2**63)
            how = f"a fresh seed for rank {self.rank} (the checkpoint has no generator state for this rank)"
        if ema_state is not None:
            self.ema.load_shadow(ema_state)
        return how


def clips_to_model(frames_uint8: torch.Tensor) -> torch.Tensor:
    """b t h w c uint8 (as stored) -> b c t h w float in [-1, 1] (as the model sees it)."""
    return rearrange(frames_uint8.float(), "b t h w c -> b c t h w") / 127.5 - 1.0
