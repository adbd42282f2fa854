"""STUNet inflation: identity at init, frozen prior, temporal resolution, frame-count errors."""

import pytest
import torch
from einops import repeat

from conftest import perturb_
from lumiere.checkpoint import build_prior, build_stunet
from lumiere.config import load_config
from lumiere.diffusion import Conditioning
from lumiere.errors import FrameCountError
from lumiere.stunet import STUNet, TemporalDownsample, TemporalUpsample
from lumiere.trainer import TrainStep


def _inputs(cfg, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    d, e = cfg.text.dims()
    ctx = torch.randn(b, cfg.text.context_length, d, generator=g)
    pooled = torch.randn(b, e, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    return ctx, pooled, t


@pytest.mark.parametrize("overrides", [[], ["unet.channel_mult=[1,2,2]", "unet.num_res_blocks=2"],
                                       ["stunet.temporal_text=true"]])
def test_inflation_reproduces_prior_on_static_video(overrides):
    cfg = load_config("tiny", overrides)
    prior = perturb_(build_prior(cfg)).eval()  # a "trained" prior: no zero-initialised outputs left
    stunet = build_stunet(cfg, prior).eval()
    ctx, pooled, t = _inputs(cfg)
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    video = repeat(image, "b c h w -> b c t h w", t=cfg.video.frames)
    with torch.no_grad():
        out_2d = prior(image, t, ctx, pooled)
        out_3d = stunet(video, t, ctx, pooled)
    assert out_2d.abs().mean() > 1e-2  # the comparison is not between two zero tensors
    expected = repeat(out_2d, "b c h w -> b c t h w", t=cfg.video.frames)
    torch.testing.assert_close(out_3d, expected, atol=1e-5, rtol=1e-5)


def test_trained_temporal_layers_mix_frames(tiny_cfg):
    """Sanity check of the above: once temporal layers move from identity, frames influence each other."""
    prior = perturb_(build_prior(tiny_cfg)).eval()
    stunet = build_stunet(tiny_cfg, prior).eval()
    perturb_(torch.nn.ModuleList([stunet.temporal_convs, stunet.temporal_attns]), seed=3)
    ctx, pooled, t = _inputs(tiny_cfg)
    video = torch.randn(2, 3, 8, 32, 32)
    changed = video.clone()
    changed[:, :, -1] += 1.0  # change only the last frame
    with torch.no_grad():
        a, b = stunet(video, t, ctx, pooled), stunet(changed, t, ctx, pooled)
    assert (a[:, :, 0] - b[:, :, 0]).abs().max() > 1e-4  # frame 0's output depends on the last frame


def test_temporal_text_gives_the_temporal_layers_the_prompt():
    """With stunet.temporal_text the temporal blocks see the pooled text: once trained (perturbed), the pooled
    embedding changes the output through them; without it, only through the prior."""
    cfg = load_config("tiny", ["stunet.temporal_text=true"])
    prior = perturb_(build_prior(cfg)).eval()
    stunet = build_stunet(cfg, prior).eval()
    assert all(block.emb_proj is not None for block in stunet.temporal_convs.values())
    assert all(block.emb_proj is None for block in build_stunet(load_config("tiny"), prior).temporal_convs.values())
    perturb_(stunet.temporal_convs, seed=4)
    ctx, pooled, t = _inputs(cfg)
    video = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        base = stunet(video, t, ctx, pooled)
        for block in stunet.temporal_convs.values():
            block.emb_proj.weight.zero_()  # cut the temporal layers' own text path
        cut = stunet(video, t, ctx, pooled)
    assert (base - cut).abs().max() > 1e-4


def test_temporal_resampling_is_nearest_neighbour_at_init():
    x = torch.randn(1, 4, 8, 3, 3)
    down = TemporalDownsample(4)(x)
    torch.testing.assert_close(down, x[:, :, ::2])
    up = TemporalUpsample(4)(down)
    torch.testing.assert_close(up, repeat(x[:, :, ::2], "b c t h w -> b c (t r) h w", r=2))


def test_only_temporal_layers_train_and_prior_is_untouched(tiny_cfg):
    prior = perturb_(build_prior(tiny_cfg))
    stunet = build_stunet(tiny_cfg, prior)
    trainable = {n for n, p in stunet.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("prior.") for n in trainable)
    assert all(not p.requires_grad for p in stunet.prior.parameters())
    assert {p for p in stunet.temporal_parameters()} == {p for p in stunet.parameters() if p.requires_grad}

    before = {n: p.detach().clone() for n, p in stunet.named_parameters()}
    step = TrainStep(stunet, tiny_cfg, "stunet")
    ctx, pooled, _ = _inputs(tiny_cfg, b=2)
    for _ in range(2):
        step(torch.rand(2, 3, 8, 32, 32) * 2 - 1, Conditioning(ctx, pooled))
    after = dict(stunet.named_parameters())
    for n, p in after.items():
        if n.startswith("prior."):
            assert torch.equal(p, before[n]), f"prior weight {n} changed"
    assert any(not torch.equal(after[n], before[n]) for n in trainable), "no temporal weight changed"


def _coarsest_frames(stunet: STUNet, frames: int, cfg) -> int:
    seen = {}

    def record(module, args):
        seen["n"] = args[0].shape[0]

    hook = stunet.prior.mid[0].register_forward_pre_hook(record)
    ctx, pooled, t = _inputs(cfg, b=1)
    with torch.no_grad():
        stunet(torch.zeros(1, 3, frames, 32, 32), t, ctx, pooled)
    hook.remove()
    return seen["n"]  # batch of the mid block = b × frames at the coarsest level


def test_coarsest_level_has_t_over_2_to_the_l_frames():
    cfg = load_config("tiny", ["unet.channel_mult=[1,2,2]"])  # 2 downsamplings
    stunet = build_stunet(cfg)
    assert stunet.temporal_factor == 4
    assert _coarsest_frames(stunet, 8, cfg) == 2
    assert _coarsest_frames(stunet, 16, cfg) == 4
    assert stunet.coarsest_frames(16) == 4


def test_fixed_temporal_variant_keeps_all_frames():
    cfg = load_config("tiny", ["unet.channel_mult=[1,2,2]", "stunet.temporal_resampling=false"])
    stunet = build_stunet(cfg)
    assert stunet.temporal_factor == 1 and len(stunet.time_down) == 0
    assert _coarsest_frames(stunet, 8, cfg) == 8
    assert _coarsest_frames(stunet, 6, cfg) == 6  # any length works without temporal resampling


def test_indivisible_frame_count_is_a_clear_error():
    cfg = load_config("tiny", ["unet.channel_mult=[1,2,2]"])
    stunet = build_stunet(cfg)
    ctx, pooled, t = _inputs(cfg, b=1)
    with pytest.raises(FrameCountError, match=r"multiple of 2\^2 = 4; got 6 frames"):
        stunet(torch.zeros(1, 3, 6, 32, 32), t, ctx, pooled)
