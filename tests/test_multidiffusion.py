"""Temporal MultiDiffusion and the SSR: windows, exact fusion, and equivalence with a single pass."""

import pytest
import torch

from conftest import perturb_
from lumiere.checkpoint import build_ssr
from lumiere.config import load_config
from lumiere.diffusion import Conditioning, sample, sampling_scheduler
from lumiere.multidiffusion import MultiDiffusion, fuse, fusion_weights, temporal_windows
from lumiere.ssr import degrade, upsample_condition


@pytest.mark.parametrize("frames,length,overlap", [(80, 16, 2), (17, 8, 2), (8, 8, 2), (5, 8, 2), (30, 7, 3),
                                                   (9, 4, 0)])
def test_windows_cover_every_frame_and_end_at_the_last(frames, length, overlap):
    wins = temporal_windows(frames, length, overlap)
    covered = torch.zeros(frames)
    for s, e in wins:
        assert e - s == min(length, frames)
        covered[s:e] += 1
    assert covered.min() >= 1 and wins[0][0] == 0 and wins[-1][1] == frames
    for (_, e0), (s1, _) in zip(wins, wins[1:], strict=False):
        assert e0 - s1 >= overlap  # consecutive windows share at least `overlap` frames


@pytest.mark.parametrize("weighting", ["uniform", "ramp"])
def test_overlap_weights_sum_to_one_per_frame(weighting):
    wins = temporal_windows(29, 8, 3)
    total = torch.zeros(29)
    for (s, e), w in zip(wins, fusion_weights(wins, 29, 3, weighting), strict=True):
        total[s:e] += w
    assert torch.allclose(total, torch.ones(29))


def test_fusing_the_windows_of_one_video_gives_that_video_back():
    video = torch.randn(2, 3, 21, 4, 4)
    wins = temporal_windows(21, 8, 2)
    assert torch.allclose(fuse([video[:, :, s:e] for s, e in wins], wins, 21, 2, "ramp"), video, atol=1e-6)


def test_fusion_is_the_per_frame_average_of_overlapping_predictions():
    wins = [(0, 4), (2, 6)]
    a, b = torch.full((1, 1, 4, 1, 1), 1.0), torch.full((1, 1, 4, 1, 1), 3.0)
    out = fuse([a, b], wins, 6).flatten().tolist()
    assert out == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]  # argmin_J Σ||J − Φ_i||²: the mean where windows overlap


def _ssr_inputs(cfg, frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    hr = cfg.video.size * cfg.ssr.scale
    lr = torch.rand(1, 3, frames, cfg.video.size, cfg.video.size, generator=g) * 2 - 1
    return (torch.randn(1, 3, frames, hr, hr, generator=g), upsample_condition(lr, cfg.ssr.scale),
            Conditioning(torch.randn(1, 16, 32, generator=g), torch.randn(1, 32, generator=g)))


def _run(model, noise, cond_video, cond, cfg):
    sched = sampling_scheduler(cfg.diffusion, "ddim", 3)
    return sample(model, noise, sched, cond, guidance_scale=1.0, condition=cond_video)


def test_one_window_covering_the_clip_equals_a_single_pass_of_the_ssr():
    cfg = load_config("tiny")
    torch.manual_seed(0)
    ssr = perturb_(build_ssr(cfg)).eval()
    noise, up, cond = _ssr_inputs(cfg, 8)
    single = _run(ssr, noise, up, cond, cfg)
    windowed = _run(MultiDiffusion(ssr, length=8, overlap=2), noise, up, cond, cfg)
    assert torch.equal(windowed, single)


def test_frame_local_model_fused_over_windows_equals_the_global_result():
    """With temporal layers that do not mix frames (the inflation blocks at their identity init), every
    window predicts exactly what the whole clip would for its frames, so fusion must reproduce it."""
    cfg = load_config("tiny")
    torch.manual_seed(0)
    ssr = build_ssr(cfg).eval()
    perturb_(ssr.prior)  # a non-trivial spatial model; temporal blocks stay identity
    noise, up, cond = _ssr_inputs(cfg, 13)
    whole = _run(ssr, noise, up, cond, cfg)
    for overlap, weighting in [(2, "uniform"), (3, "ramp"), (0, "uniform")]:
        md = MultiDiffusion(ssr, length=4, overlap=overlap, weighting=weighting)
        assert torch.allclose(_run(md, noise, up, cond, cfg), whole, atol=1e-5)


def test_batched_and_unbatched_windows_agree():
    cfg = load_config("tiny")
    ssr = perturb_(build_ssr(cfg)).eval()
    noise, up, cond = _ssr_inputs(cfg, 12)
    a = _run(MultiDiffusion(ssr, 8, 2), noise, up, cond, cfg)
    b = _run(MultiDiffusion(ssr, 8, 2, windows_per_call=1), noise, up, cond, cfg)
    assert torch.allclose(a, b, atol=1e-5)


def test_ssr_condition_is_the_bilinear_upsample_of_the_degraded_clip():
    hr = torch.rand(1, 3, 2, 8, 8)
    lr = degrade(hr, 2)
    assert lr.shape == (1, 3, 2, 4, 4)
    assert torch.allclose(lr[0, :, 0, 0, 0], hr[0, :, 0, :2, :2].mean((-1, -2)))
    up = upsample_condition(lr, 2)
    assert up.shape == hr.shape
    flat = torch.full((1, 3, 2, 4, 4), 0.25)
    assert torch.allclose(upsample_condition(flat, 2), torch.full((1, 3, 2, 8, 8), 0.25))


def test_bad_window_settings_are_clear_errors():
    with pytest.raises(ValueError, match="overlap"):
        temporal_windows(20, 8, 8)
    with pytest.raises(Exception, match="overlap"):
        load_config("tiny", ["ssr.overlap=9", "ssr.window=8"])
