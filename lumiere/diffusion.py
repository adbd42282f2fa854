"""Diffusion: noise schedule, training loss, classifier-free guidance and samplers.

Axes: b batch, c channels, then any spatial/temporal axes (h w for images, t h w for videos): everything here
broadcasts over the trailing axes, so the same functions train and sample the 2D prior and the STUNet.

Choices (see docs/decisions.md): discrete-time DDPM, cosine schedule (`squaredcos_cap_v2`, suited to small
pixel-space images), v-prediction (well-conditioned at both ends of the schedule, which matters with a cosine
schedule and with few sampling steps), classifier-free guidance with the null condition = all-zero text
features. Schedulers come from `diffusers`; the loops are plain functions over (model, x, schedule) with the
conditioning passed explicitly, as in k-diffusion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

SamplerName = Literal["ddim", "dpmsolver++", "ddpm"]
SAMPLERS: tuple[str, ...] = ("ddim", "dpmsolver++", "ddpm")


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"
    prediction_type: Literal["v_prediction", "epsilon"] = "v_prediction"
    cond_dropout: float = 0.1  # probability of training a sample with the null text condition (for CFG)
    # training timesteps: u ~ U(0, 1) mapped to s·u / (1 + (s - 1)·u) of the schedule (SD3's shift); 1 = uniform,
    # > 1 spends more steps at high noise, where a video's trajectory is decided (16 frames carry a motion far
    # longer through the noise than one frame carries a position). The schedule itself is unchanged, so a frozen
    # prior sees the noise levels it was trained on. The small and base configs set 3 (benchmarks/RESULTS.md runs
    # Q-S: with it the motion layers leave the plateau at the top of the schedule within a few thousand steps).
    timestep_shift: float = 1.0
    # weight of a second loss term on videos: the MSE of the prediction error's frame-to-frame differences. Pixel
    # MSE pays little for a small shape's motion (measured: knowing the prompted direction lowers the x0 loss from
    # pure noise by ~10 %, benchmarks/RESULTS.md runs S and C); the static content cancels in frame differences, so
    # this term is mostly motion. 0 = the plain loss; images (b c h w) never get it. Measured at weight 1 (run P):
    # no gain in direction at 1,500 steps, so off by default.
    motion_loss_weight: float = 0.0
    # STUNet training only: its first `top_noise_steps` steps draw timesteps from the top `top_noise_fraction` of
    # the schedule alone (t ≥ (1 − fraction)·T), then the normal draw (with the shift). The motion layers learn
    # the prompted motion first where a sample's trajectory is decided, from noise alone (a plateau, then an
    # escape: benchmarks/motion_plateau.py); mixed with every other noise level that phase lasts ~7× longer.
    # 0 = off (the default); benchmarks/RESULTS.md run V measures it.
    top_noise_steps: int = 0
    top_noise_fraction: float = 0.05

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self):
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError("cond_dropout must be in [0, 1)")
        if not self.timestep_shift > 0:
            raise ValueError(f"timestep_shift must be > 0 (1 = uniform timesteps), got {self.timestep_shift}")
        if not self.motion_loss_weight >= 0:
            raise ValueError(f"motion_loss_weight must be >= 0 (0 = the plain loss), got {self.motion_loss_weight}")
        if self.top_noise_steps < 0 or not 0.0 < self.top_noise_fraction <= 1.0:
            raise ValueError(f"top_noise_steps must be >= 0 and top_noise_fraction in (0, 1] (the share of the "
                             f"schedule at its noisy end); got {self.top_noise_steps} and {self.top_noise_fraction}")


@dataclass
class Conditioning:
    """Text conditioning for a batch: token features (b l d) and pooled embedding (b e)."""

    context: torch.Tensor
    pooled: torch.Tensor

    def null(self) -> Conditioning:
        """The unconditional input used for guidance: all-zero text features."""
        return Conditioning(torch.zeros_like(self.context), torch.zeros_like(self.pooled))

    def cat(self, other: Conditioning) -> Conditioning:
        return Conditioning(torch.cat([self.context, other.context]), torch.cat([self.pooled, other.pooled]))

    def to(self, *args, **kwargs) -> Conditioning:
        return Conditioning(self.context.to(*args, **kwargs), self.pooled.to(*args, **kwargs))


Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _schedule_kwargs(cfg: DiffusionConfig) -> dict:
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
    )


def training_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(**_schedule_kwargs(cfg))


def sampling_scheduler(cfg: DiffusionConfig, sampler: str, steps: int):
    """A diffusers scheduler for `sampler`, set up for `steps` steps on the training schedule."""
    kwargs = _schedule_kwargs(cfg)
    # trailing spacing starts sampling at the last training timestep (pure noise), which few-step sampling needs
    if sampler == "ddim":
        sched = DDIMScheduler(**kwargs, clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing")
    elif sampler == "dpmsolver++":
        sched = DPMSolverMultistepScheduler(
            **kwargs,
            algorithm_type="dpmsolver++",
            solver_order=2,
            thresholding=True,  # pixel space: keep the predicted x0 in [-1, 1] (Imagen's dynamic thresholding)
            sample_max_value=1.0,
            timestep_spacing="trailing",
            final_sigmas_type="zero",
        )
    elif sampler == "ddpm":
        sched = DDPMScheduler(**kwargs, clip_sample=True, timestep_spacing="trailing")
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sched.set_timesteps(steps)
    return sched


def drop_conditioning(cond: Conditioning, p: float, generator: torch.Generator | None = None) -> Conditioning:
    """Replace each sample's text with the null condition with probability p (classifier-free guidance)."""
    if p <= 0:
        return cond
    keep = (torch.rand(cond.context.shape[0], generator=generator, device="cpu") >= p).to(cond.context.device)
    return Conditioning(
        cond.context * keep[:, None, None].to(cond.context.dtype),
        cond.pooled * keep[:, None].to(cond.pooled.dtype),
    )


def with_condition(x: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
    """The model input: the noisy sample with the condition channels appended (b c+k ...).

    A condition batch smaller than x (guidance doubles the batch) is repeated to match.
    """
    if condition is None:
        return x
    if condition.shape[0] != x.shape[0]:
        condition = condition.repeat(x.shape[0] // condition.shape[0], *[1] * (condition.ndim - 1))
    return torch.cat([x, condition.to(x.dtype)], dim=1)


def draw_noise(x0: torch.Tensor, scheduler: DDPMScheduler, generator: torch.Generator | None = None,
               shift: float = 1.0, top_fraction: float | None = None):
    """The random part of a training loss: noise like x0 and a timestep per sample (drawn on the CPU, so a seed
    gives the same draws on every device); `shift` > 1 favours high noise (`DiffusionConfig.timestep_shift`);
    `top_fraction`: uniform over the top fraction of the schedule only (`DiffusionConfig.top_noise_steps`)."""
    noise = torch.randn(x0.shape, generator=generator, device="cpu")
    steps = scheduler.config.num_train_timesteps
    if top_fraction is not None:
        low = min(steps - 1, int(round(steps * (1.0 - top_fraction))))
        t = torch.randint(low, steps, (x0.shape[0],), generator=generator, device="cpu")
    elif shift == 1.0:
        t = torch.randint(0, steps, (x0.shape[0],), generator=generator, device="cpu")
    else:
        u = torch.rand(x0.shape[0], generator=generator, device="cpu", dtype=torch.float64)
        t = (shift * u / (1 + (shift - 1) * u) * steps).long().clamp(0, steps - 1)
    return noise, t


def diffusion_loss(
    model: Denoiser,
    x0: torch.Tensor,
    cond: Conditioning,
    scheduler: DDPMScheduler,
    generator: torch.Generator | None = None,
    condition: torch.Tensor | None = None,
    noise_and_t: tuple[torch.Tensor, torch.Tensor] | None = None,
    motion_weight: float = 0.0,
) -> torch.Tensor:
    """MSE between the model's prediction at a random timestep and the v (or ε) target; x0 in [-1, 1].

    `motion_weight` (videos b c t h w only): plus that weight times the MSE of the error's differences between
    consecutive frames (`DiffusionConfig.motion_loss_weight`). With v-prediction the error is −(x̂0 − x0)/σ_t, so
    at high noise this term scores the predicted motion of x0 itself.

    `condition` (b k ...) is concatenated to the noisy input on the channel axis: the conditional STUNet's
    ⟨C, M⟩ (k=4) or the SSR's upsampled low-resolution video (k=3). `noise_and_t`: the noise and timesteps
    drawn beforehand (`draw_noise`), e.g. for a whole batch that is then run as micro-batches.
    """
    noise, t = noise_and_t if noise_and_t is not None else draw_noise(x0, scheduler, generator)
    noise, t = noise.to(x0), t.to(x0.device)
    xt = scheduler.add_noise(x0, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:
        target = noise
    pred = model(with_condition(xt, condition), t, cond.context, cond.pooled)
    loss = F.mse_loss(pred.float(), target.float())
    if motion_weight and pred.ndim == 5 and pred.shape[2] > 1:
        error = pred.float() - target.float()
        loss = loss + motion_weight * (error[:, :, 1:] - error[:, :, :-1]).pow(2).mean()
    return loss


@torch.no_grad()
def sample(
    model: Denoiser,
    noise: torch.Tensor,
    scheduler,
    cond: Conditioning,
    *,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
    condition: torch.Tensor | None = None,
    start_step: int = 0,
    known: tuple[torch.Tensor, torch.Tensor] | None = None,
    uncond: Conditioning | None = None,
    preview: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Denoise `noise` (b c ...) with `scheduler`'s timesteps; returns x0 in about [-1, 1].

    `preview(step, x0)` is called after every step (1-based) with that step's (guided) prediction of the clean
    sample, where the scheduler gives one (DDIM, DDPM): to show or study what the sampler commits to, and when.

    With guidance_scale != 1 the model sees [cond; null] in one batch and the prediction is
    null + g · (cond − null), where null is `uncond` when given (a negative prompt's features: guidance then
    pushes away from it) and else the all-zero text the model was trained to treat as no prompt; the
    `condition` channels (image/mask/low-res video) are kept in both halves, so guidance acts on the text only.
    With `start_step > 0`, `noise` is an already-noised sample at
    timestep `scheduler.timesteps[start_step]` (SDEdit, see `noise_to_strength`) and sampling continues
    from there.

    `known = (x0, mask)` (mask 1 = known, broadcastable to x) replaces the known pixels of every intermediate
    sample by x0 noised to the same level (RePaint-style replacement), so the model always sees the true
    known content at the right noise level and the known pixels end exactly as given.
    """
    timesteps = scheduler.timesteps[start_step:]
    if start_step:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start_step)
        x = noise
    else:
        x = noise * scheduler.init_noise_sigma
    guided = guidance_scale != 1.0
    both = cond.cat(uncond if uncond is not None else cond.null()) if guided else cond
    steps = len(timesteps)
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t)
        if guided:
            x_in = torch.cat([x_in, x_in])
        ts = torch.full((x_in.shape[0],), int(t), device=x.device, dtype=torch.long)
        out = model(with_condition(x_in, condition), ts, both.context, both.pooled)
        if guided:
            out_cond, out_null = out.chunk(2)
            out = out_null + guidance_scale * (out_cond - out_null)
        stepped = scheduler.step(out, t, x, generator=generator)
        x = stepped.prev_sample
        if preview is not None and getattr(stepped, "pred_original_sample", None) is not None:
            preview(i + 1, stepped.pred_original_sample)
        if known is not None:
            x = _replace_known(scheduler, x, known, timesteps, i, generator)
        if callback is not None:
            callback(i + 1, steps)
    return x


def _replace_known(scheduler, x, known, timesteps, i, generator):
    x0, mask = known
    if i + 1 < len(timesteps):
        noise = torch.randn(x.shape, generator=generator, device="cpu").to(x)
        x0 = scheduler.add_noise(x0.to(x), noise, timesteps[i + 1 : i + 2].to(x.device))
    return mask * x0.to(x) + (1 - mask) * x


def noise_to_strength(
    scheduler, x0: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, int]:
    """SDEdit: noise a clean sample x0 to `strength` ∈ (0, 1] of the sampling schedule.

    Returns (x_t, start_step) for `sample(..., start_step=start_step)`. strength 1 is pure noise (plain
    generation); a strength below one step of the schedule returns x0 itself with start_step = len(steps).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    steps = len(scheduler.timesteps)
    n = min(steps, int(round(steps * strength)))
    start = steps - n
    if n == 0:
        return x0, start
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0)
    t = scheduler.timesteps[start : start + 1].to(x0.device)
    return scheduler.add_noise(x0, noise, t), start
