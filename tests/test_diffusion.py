"""Diffusion: the loss learns, samplers are seeded and reproducible, guidance combines cond and null."""

import numpy as np
import pytest
import torch

from conftest import perturb_
from lumiere.checkpoint import build_prior
from lumiere.config import load_config
from lumiere.diffusion import (
    Conditioning,
    diffusion_loss,
    draw_noise,
    drop_conditioning,
    sample,
    sampling_scheduler,
    training_scheduler,
)
from lumiere.pipeline import TextToVideo
from lumiere.shapes import ShapeSpec, render_clip
from lumiere.trainer import TrainStep
from lumiere.video import frames_to_tensor


def _eval_loss(model, x0, cond, sched, seed=123, repeats=8):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)  # same timesteps and noise every evaluation
        return sum(float(diffusion_loss(model, x0, cond, sched, g)) for _ in range(repeats)) / repeats


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_loss_falls_when_overfitting_one_batch(prediction):
    cfg = load_config("tiny", [f"diffusion.prediction_type={prediction}", "train.lr=0.003",
                               "train.warmup_steps=5", "train.max_steps=150", "diffusion.cond_dropout=0"])
    torch.manual_seed(0)
    model = build_prior(cfg)
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    specs = [ShapeSpec("square", "red", "right"), ShapeSpec("circle", "blue", "up"),
             ShapeSpec("triangle", "green", "left"), ShapeSpec("square", "yellow", "down")]
    # a fixed batch of four shape images (first frames of rendered clips)
    x0 = torch.stack([frames_to_tensor(render_clip([s], 8, 32, rng))[:, 0] for s in specs])
    cond = Conditioning(torch.randn(4, 16, 32, generator=g), torch.randn(4, 32, generator=g))
    sched = training_scheduler(cfg.diffusion)
    before = _eval_loss(model, x0, cond, sched)
    step = TrainStep(model, cfg, "t2i")
    clips = x0[:, :, None]  # b c 1 h w: the 2D trainer picks a frame per clip
    for _ in range(150):
        step(clips, cond)
    after = _eval_loss(model, x0, cond, sched)
    assert after < 0.5 * before, (before, after)


def test_drop_conditioning_zeroes_whole_samples():
    cond = Conditioning(torch.ones(1000, 4, 8), torch.ones(1000, 8))
    dropped = drop_conditioning(cond, 0.3, torch.Generator().manual_seed(0))
    null = dropped.context.sum(dim=(1, 2)) == 0
    assert torch.equal(null, dropped.pooled.sum(dim=1) == 0)
    assert 0.25 < null.float().mean() < 0.35
    assert torch.all(dropped.context[~null] == 1)


def test_guidance_combines_conditional_and_null_predictions():
    """With a model that returns its pooled input as the prediction, one step shows the CFG formula."""
    seen = []

    def model(x, t, context, pooled):
        seen.append(pooled[:, 0].clone())
        return pooled[:, :1, None, None].expand_as(x)

    cfg = load_config("tiny")
    sched = sampling_scheduler(cfg.diffusion, "ddim", 1)
    cond = Conditioning(torch.ones(1, 2, 32), torch.full((1, 32), 0.5))
    sample(model, torch.zeros(1, 3, 4, 4), sched, cond, guidance_scale=3.0)
    assert torch.equal(seen[0], torch.tensor([0.5, 0.0]))  # one batch: [cond; null]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_preview_gets_each_steps_prediction_of_the_clean_sample(sampler):
    """A denoiser that knows the clean sample (its v output is exact for x0 = target): every step's preview is
    that target, once per step in order, and sampling ends on it."""
    cfg = load_config("tiny")
    sched = sampling_scheduler(cfg.diffusion, sampler, 5)
    target = torch.linspace(-0.8, 0.8, 3 * 4 * 4).reshape(1, 3, 4, 4)
    ab_all = sched.alphas_cumprod

    def oracle(x, t, context, pooled):
        ab = ab_all[t].view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * target) / (1 - ab).sqrt()
        return ab.sqrt() * eps - (1 - ab).sqrt() * target  # v for this x0

    previews = []
    out = sample(oracle, torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)), sched,
                 Conditioning(torch.zeros(1, 2, 32), torch.zeros(1, 32)),
                 generator=torch.Generator().manual_seed(1), preview=lambda i, x0: previews.append((i, x0)))
    assert [i for i, _ in previews] == [1, 2, 3, 4, 5]
    assert all(torch.allclose(x0, target, atol=1e-4) for _, x0 in previews)
    assert torch.allclose(out, target, atol=1e-3)


def test_a_negative_prompt_replaces_the_null_condition_in_guidance(tiny_cfg):
    """The negative prompt's features are the guidance's other half ([cond; negative]); guiding a prompt away from
    itself leaves the conditional prediction, so the result equals unguided sampling."""
    seen = []

    def model(x, t, context, pooled):
        seen.append(pooled[:, 0].clone())
        return pooled[:, :1, None, None].expand_as(x)

    sched = sampling_scheduler(tiny_cfg.diffusion, "ddim", 1)
    cond = Conditioning(torch.ones(1, 2, 32), torch.full((1, 32), 0.5))
    sample(model, torch.zeros(1, 3, 4, 4), sched, cond, guidance_scale=3.0,
           uncond=Conditioning(torch.ones(1, 2, 32), torch.full((1, 32), -0.25)))
    assert torch.equal(seen[0], torch.tensor([0.5, -0.25]))
    gen = TextToVideo.random_init(tiny_cfg)
    perturb_(gen.model.prior, std=0.02)
    p = "a red square moving right"
    plain = gen.generate([p], seed=3, steps=3, guidance_scale=1.0).videos
    self_negative = gen.generate([p], seed=3, steps=3, guidance_scale=4.0, negative_prompt=p).videos
    other_negative = gen.generate([p], seed=3, steps=3, guidance_scale=4.0, negative_prompt="blurry").videos
    assert np.abs(plain.astype(int) - self_negative.astype(int)).max() <= 1  # g * (c - c) = 0 (rounding aside)
    assert not np.array_equal(self_negative, other_negative)


def test_the_style_cache_keeps_at_most_its_size(tiny_cfg, tmp_path, monkeypatch):
    """Each cached style is a whole model copy: least recently used first out."""
    import lumiere.style

    gen = TextToVideo.random_init(tiny_cfg)
    gen.style_cache_size = 2
    monkeypatch.setattr(lumiere.style, "load_style", lambda path: ({}, {}))
    monkeypatch.setattr(lumiere.style, "interpolate_prior", lambda model, state, strength, fp: torch.nn.Identity())
    for name in ("a", "b", "a", "c"):
        gen.styled(tmp_path / name, 1.0)
    assert [k[0] for k in gen._styled] == [str(tmp_path / "a"), str(tmp_path / "c")]  # b was least recent


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++", "ddpm"])
def test_sampling_is_bit_identical_for_a_seed(tiny_cfg, sampler):
    gen = TextToVideo.random_init(tiny_cfg)
    perturb_(gen.model.prior, std=0.02)  # so the prediction is not identically zero
    kwargs = dict(steps=4, sampler=sampler, guidance_scale=2.0)
    a = gen.generate(["a red square moving right"], seed=7, **kwargs).videos
    b = gen.generate(["a red square moving right"], seed=7, **kwargs).videos
    c = gen.generate(["a red square moving right"], seed=8, **kwargs).videos
    assert a.shape == (1, 8, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_unknown_sampler_and_bad_steps_are_clear_errors(tiny_cfg):
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        sampling_scheduler(tiny_cfg.diffusion, "euler", 10)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sampling_scheduler(tiny_cfg.diffusion, "ddim", 0)


def test_timestep_shift_spends_more_training_steps_at_high_noise():
    sched = training_scheduler(load_config("tiny").diffusion)
    x0 = torch.zeros(4000, 1)
    _, uniform = draw_noise(x0, sched, torch.Generator().manual_seed(0))
    _, shifted = draw_noise(x0, sched, torch.Generator().manual_seed(0), shift=3.0)
    assert 0 <= int(shifted.min()) and int(shifted.max()) <= 999
    assert abs(float((uniform >= 500).float().mean()) - 0.5) < 0.03
    # s·u / (1 + (s - 1)·u) >= 1/2 for u >= 1/(s + 1): 3/4 of the draws with s = 3
    assert abs(float((shifted >= 500).float().mean()) - 0.75) < 0.03
    with pytest.raises(ValueError, match="timestep_shift must be > 0"):
        load_config("tiny", ["diffusion.timestep_shift=0"])


class _TimestepRecorder(torch.nn.Module):
    """The training forward, passed through, recording the timesteps each step trains at."""

    def __init__(self, model):
        super().__init__()
        self.model, self.timesteps = model, []

    def forward(self, x, timesteps, *args):
        self.timesteps.append(timesteps.detach().clone())
        return self.model(x, timesteps, *args)


def test_top_noise_steps_train_the_stunet_at_the_noisy_end_first_then_everywhere():
    """`diffusion.top_noise_steps`: the STUNet's first steps draw t from the top fraction of the schedule only,
    the steps after it from the whole (shifted) schedule; a t2i prior trained from the same config never gets it;
    a bad value is refused."""
    from lumiere.checkpoint import build_stunet

    cfg = load_config("tiny", ["diffusion.top_noise_steps=3", "diffusion.top_noise_fraction=0.1",
                               "train.batch_size=16"])
    _, top = draw_noise(torch.zeros(4000, 1), training_scheduler(cfg.diffusion), torch.Generator().manual_seed(0),
                        top_fraction=0.1)
    assert int(top.min()) == 900 and int(top.max()) == 999
    d, e = cfg.text.dims()
    cond = Conditioning(torch.randn(16, 16, d), torch.randn(16, e))
    stunet = build_stunet(cfg, build_prior(cfg))
    recorder = _TimestepRecorder(stunet)
    step = TrainStep(stunet, cfg, "stunet", forward=recorder)
    for _ in range(5):
        step(torch.rand(16, 3, 8, 32, 32) * 2 - 1, cond)
    first, after = torch.cat(recorder.timesteps[:3]), torch.cat(recorder.timesteps[3:])
    assert int(first.min()) >= 900, first  # 48 draws, all at the top
    assert int(after.min()) < 900, after  # 32 draws from the whole schedule: P(all >= 900) = 0.1^32
    prior = build_prior(cfg)
    recorder = _TimestepRecorder(prior)
    step = TrainStep(prior, cfg, "t2i", forward=recorder)
    step(torch.rand(16, 3, 8, 32, 32) * 2 - 1, cond)
    assert int(torch.cat(recorder.timesteps).min()) < 900  # the prior's steps are not the STUNet's curriculum
    with pytest.warns(UserWarning, match=r"top_noise_steps \(3\) >= train.max_steps \(2\)"):
        TrainStep(build_stunet(cfg, build_prior(cfg)), load_config("tiny", ["diffusion.top_noise_steps=3",
                                                                            "train.max_steps=2"]), "stunet")
    with pytest.raises(ValueError, match="top_noise_fraction in"):
        load_config("tiny", ["diffusion.top_noise_fraction=0"])


def test_motion_loss_scores_the_error_that_changes_between_frames_only():
    """`diffusion.motion_loss_weight`: an error that is the same in every frame (a wrong static picture) costs
    what it costs without the term; an error that differs from frame to frame (wrong motion) of the same size
    costs more; images never get the term; a negative weight is refused."""
    sched = training_scheduler(load_config("tiny").diffusion)
    x0 = torch.zeros(2, 3, 8, 8, 8)
    cond = Conditioning(torch.zeros(2, 4, 8), torch.zeros(2, 8))
    static_error = torch.randn(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(0)).expand(-1, -1, 8, -1, -1)
    moving_error = torch.randn(2, 3, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    moving_error = moving_error / moving_error.std() * static_error.std()

    def loss(error, weight, video=True):
        noise = torch.randn(x0.shape if video else x0[:, :, 0].shape, generator=torch.Generator().manual_seed(2))
        t = torch.full((2,), 500)
        target = sched.get_velocity(x0 if video else x0[:, :, 0], noise, t)
        model = lambda xt, *_: target + (error if video else error[:, :, 0])  # noqa: E731
        return float(diffusion_loss(model, x0 if video else x0[:, :, 0], cond, sched, noise_and_t=(noise, t),
                                    motion_weight=weight))

    assert loss(static_error, 1.0) == pytest.approx(loss(static_error, 0.0), rel=1e-6)
    plain = loss(moving_error, 0.0)
    assert plain == pytest.approx(loss(static_error, 0.0), rel=0.05)  # the same size of error...
    assert loss(moving_error, 1.0) > 2.5 * plain  # ...costs ~3x: the frame differences of white error are 2x its size
    assert loss(moving_error, 1.0, video=False) == pytest.approx(loss(moving_error, 0.0, video=False), rel=1e-6)
    with pytest.raises(ValueError, match="motion_loss_weight"):
        load_config("tiny", ["diffusion.motion_loss_weight=-1"])
