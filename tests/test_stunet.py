"""STUNet inflation: identity at init, the paper's block layout, the motion layers' own text path, frozen prior,
temporal resolution, frame-count errors."""

import pytest
import torch
from einops import repeat

from conftest import perturb_
from lumiere.checkpoint import build_prior, build_stunet
from lumiere.config import load_config
from lumiere.diffusion import Conditioning
from lumiere.errors import FrameCountError
from lumiere.stunet import (
    FactorizedConvBlock,
    MotionConditioning,
    STUNet,
    TemporalAttentionBlock,
    TemporalConvBlock,
    TemporalDownsample,
    TemporalUpsample,
)
from lumiere.trainer import TrainStep


def _inputs(cfg, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    d, e = cfg.text.dims()
    ctx = torch.randn(b, cfg.text.context_length, d, generator=g)
    pooled = torch.randn(b, e, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    return ctx, pooled, t


@pytest.mark.parametrize("overrides", [[], ["unet.channel_mult=[1,2,2]", "unet.num_res_blocks=2"],
                                       ["stunet.conv_block=temporal", "stunet.motion_conditioning=false"],
                                       ["stunet.coarsest_conv=true"], ["stunet.coordinates=true"],
                                       ["stunet.motion_text_pool=attention_max"],
                                       ["stunet.coarsest_attention=spacetime"]])
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


def test_inflation_reproduces_prior_frame_by_frame_on_a_moving_video():
    """Every new block starts as the identity: without temporal resampling (which at init is nearest-neighbour in
    time), a video whose frames all differ comes out as the prior's output for each frame."""
    cfg = load_config("tiny", ["stunet.temporal_resampling=false"])
    prior = perturb_(build_prior(cfg)).eval()
    stunet = build_stunet(cfg, prior).eval()
    ctx, pooled, t = _inputs(cfg)
    video = torch.randn(2, 3, cfg.video.frames, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out_3d = stunet(video, t, ctx, pooled)
        per_frame = torch.stack([prior(video[:, :, i], t, ctx, pooled) for i in range(cfg.video.frames)], dim=2)
    assert per_frame.abs().mean() > 1e-2
    torch.testing.assert_close(out_3d, per_frame, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [
    lambda: FactorizedConvBlock(8, 4, emb_dim=16),
    lambda: FactorizedConvBlock(8, 4, emb_dim=16, coordinates=True),
    lambda: TemporalConvBlock(8, 4, emb_dim=16),
    lambda: TemporalAttentionBlock(8, 4, context_dim=16),
    lambda: TemporalAttentionBlock(8, 4, context_dim=16, spacetime=True),
])
def test_every_new_block_is_the_identity_at_init_and_not_after_training(block):
    b = block()
    x = torch.randn(2, 8, 4, 6, 6, generator=torch.Generator().manual_seed(0))  # moving: every frame differs
    cond = torch.randn(2, 5, 16) if isinstance(b, TemporalAttentionBlock) else torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(b(x, cond), x)
        perturb_(b, seed=1)
        assert (b(x, cond) - x).abs().max() > 1e-3


def test_blocks_follow_the_paper_layout(tiny_cfg):
    """Conv inflation blocks at every level but the coarsest, attention blocks at the coarsest only; the conv
    blocks are factorized, with a trainable spatial conv of their own."""
    stunet = build_stunet(tiny_cfg)
    coarsest = {k.replace(".", "_") for k in stunet.prior.coarsest_keys()}
    every = {k.replace(".", "_") for k in stunet.prior.block_channels()}
    assert set(stunet.temporal_attns) == coarsest
    assert set(stunet.temporal_convs) == every - coarsest and stunet.temporal_convs
    assert all(isinstance(b, FactorizedConvBlock) and b.spatial.weight.requires_grad
               for b in stunet.temporal_convs.values())
    no_attn = build_stunet(load_config("tiny", ["stunet.temporal_attention=false"]))
    assert set(no_attn.temporal_convs) == every and not no_attn.temporal_attns  # e.g. the SSR
    both = build_stunet(load_config("tiny", ["stunet.coarsest_conv=true"]))  # the ablation beyond the paper
    assert set(both.temporal_convs) == every and set(both.temporal_attns) == coarsest


def test_factorized_block_moves_content_in_space_the_temporal_block_cannot():
    """Moving a shape is a spatial shift that depends on time: with the prior frozen, only the factorized block
    has a trainable spatial kernel. Trained (perturbed), its output at a pixel depends on the neighbouring pixel.
    (The same bump at a far pixel changes the GroupNorm statistics just as much, so only locality differs.)"""
    near, far = torch.zeros(1, 8, 4, 6, 6), torch.zeros(1, 8, 4, 6, 6)
    near[..., 2, 3] += 1.0  # next to pixel (2, 4)
    far[..., 5, 0] += 1.0  # far from it
    emb = torch.zeros(1, 16)
    for block, mixes in ((FactorizedConvBlock(8, 4, 16), True), (TemporalConvBlock(8, 4, 16), False)):
        perturb_(block, seed=2)
        with torch.no_grad():
            diff = (block(near, emb) - block(far, emb))[..., 2, 4]
        assert (diff.abs().max() > 1e-4) == mixes, type(block).__name__


def test_spacetime_attention_links_a_place_in_one_frame_to_another_place_in_another_frame():
    """A shape that moved is at another pixel in a later frame. Trained (perturbed), a spacetime attention block's
    output at pixel (0, 0) of frame 0 depends on pixel (5, 5) of the last frame; a temporal one's (each pixel over
    its own column of frames, no norm across pixels) does not."""
    x = torch.randn(1, 8, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    moved = x.clone()
    moved[:, :, -1, 5, 5] += torch.linspace(-1, 1, 8)  # not one constant over channels: LayerNorm removes that
    tokens = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
    for spacetime in (True, False):
        block = perturb_(TemporalAttentionBlock(8, 4, context_dim=16, spacetime=spacetime), seed=4)
        with torch.no_grad():
            diff = (block(moved, tokens) - block(x, tokens))[:, :, 0, 0, 0]
        assert (diff.abs().max() > 1e-4) == spacetime, spacetime


def test_coordinates_let_a_block_place_content_by_frame_and_position():
    """A prompted motion is, from pure noise, a blob whose place depends on the frame. On a blank clip (every
    pixel of every frame the same), a trained block with coordinates puts out different values at different
    frames and at different places in the frame's interior; without them its output is the same everywhere
    except where the zero padding of its convs reaches (the clip's first and last frame, the frame's border)."""
    blank = torch.full((1, 8, 8, 10, 10), 0.3)
    emb = torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
    for coordinates in (True, False):
        block = perturb_(FactorizedConvBlock(8, 4, 16, coordinates=coordinates), seed=5)
        with torch.no_grad():
            out = block(blank, emb)[:, :, 1:-1, 1:-1, 1:-1]  # away from every padded edge
        spread = float(out.std(dim=(2, 3, 4)).max())
        assert (spread > 1e-3) == coordinates, (coordinates, spread)
    with pytest.raises(ValueError, match="conv_block: factorized"):
        build_stunet(load_config("tiny", ["stunet.coordinates=true", "stunet.conv_block=temporal"]))


def test_motion_layers_get_the_timestep_and_the_prompt_through_their_own_path():
    """Trained (perturbed), the STUNet's output depends on the prompt and the timestep through the motion layers'
    own conditioning; cutting that path (zeroing its text / time projections) changes the output. Without
    `stunet.motion_conditioning` there is no such path."""
    cfg = load_config("tiny")
    prior = perturb_(build_prior(cfg)).eval()
    stunet = build_stunet(cfg, prior).eval()
    assert stunet.motion is not None and all(b.emb_proj is not None for b in stunet.temporal_convs.values())
    assert all(b.cross is not None for b in stunet.temporal_attns.values())
    off = build_stunet(load_config("tiny", ["stunet.motion_conditioning=false"]), prior)
    assert off.motion is None and all(b.emb_proj is None for b in off.temporal_convs.values())
    perturb_(torch.nn.ModuleList([stunet.motion, stunet.temporal_convs, stunet.temporal_attns]), seed=4)
    ctx, pooled, t = _inputs(cfg)
    video = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        base = stunet(video, t, ctx, pooled)
        stunet.motion.text_mlp[1].weight.zero_()  # cut the pooled text path into the conv blocks
        no_pooled_text = stunet(video, t, ctx, pooled)
        stunet.motion.token_proj[-1].weight.zero_()
        stunet.motion.token_proj[-1].bias.zero_()  # and the tokens the coarsest attention cross-attends to
        no_tokens = stunet(video, t, ctx, pooled)
        stunet.motion.time_mlp[-1].weight.zero_()
        no_time = stunet(video, t, ctx, pooled)
    assert (base - no_pooled_text).abs().max() > 1e-4
    assert (no_pooled_text - no_tokens).abs().max() > 1e-4
    assert (no_tokens - no_time).abs().max() > 1e-4


def test_motion_text_path_learns_to_separate_prompts_the_frozen_encoder_barely_does():
    """The text path is trainable: a few steps of fitting two near-identical token sequences to opposite targets
    push their motion embeddings apart (the frozen features themselves stay put)."""
    torch.manual_seed(0)
    cfg = load_config("tiny")
    stunet = build_stunet(cfg)
    d, e = cfg.text.dims()
    base = torch.randn(1, 16, d)
    ctx = base.repeat(2, 1, 1)
    ctx[1, 5] += 0.1 * torch.randn(d)  # one token differs slightly: "left" vs "right"
    pooled = torch.zeros(2, e)
    cos = lambda: float(torch.cosine_similarity(*stunet.motion.text(ctx, pooled)[0], dim=0))  # noqa: E731
    before = cos()
    opt = torch.optim.Adam(stunet.motion.parameters(), lr=1e-2)
    target = torch.stack([torch.ones(stunet.prior.emb_dim), -torch.ones(stunet.prior.emb_dim)])
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.mse_loss(stunet.motion.text(ctx, pooled)[0], target).backward()
        opt.step()
    assert before > 0.9 and cos() < 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_max_pool_passes_a_motion_word_at_full_size_whatever_the_prompt_length(seed):
    """One word of a prompt ("left" among fillers): at init the softmax pool dilutes its effect on the motion
    embedding by the number of tokens (a quarter at 4x the length), the attention + max pool
    (`stunet.motion_text_pool=attention_max`) keeps most of it, and several times the attention pool's."""
    g = torch.Generator().manual_seed(seed)
    filler, word = torch.randn(32, generator=g), torch.randn(32, generator=g)
    effect = {}
    for pool in ("attention", "attention_max"):
        torch.manual_seed(seed)
        motion = MotionConditioning(32, 32, 64, 32, pool=pool)
        for length in (8, 32):
            ctx = filler.repeat(2, length, 1)
            ctx[1, 1] = word
            with torch.no_grad():
                emb = motion.text(ctx, None)[0]
            effect[pool, length] = float((emb[1] - emb[0]).norm())
    assert effect["attention", 32] / effect["attention", 8] < 0.3  # diluted ~8/32
    assert effect["attention_max", 32] / effect["attention_max", 8] > 0.8
    assert effect["attention_max", 8] > 3 * effect["attention", 8]
    with pytest.raises(ValueError, match="motion_text_pool"):
        MotionConditioning(32, 32, 64, 32, pool="mean")


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
