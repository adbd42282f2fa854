"""⟨J, C, M⟩ conditioning: the condition tensors of every task element by element, and the 7-channel model."""

import pytest
import torch

from conftest import perturb_
from lumiere.checkpoint import build_stunet
from lumiere.conditioning import (
    cinemagraph_condition,
    composite,
    extend_condition,
    i2v_condition,
    inpaint_condition,
    random_training_condition,
    t2v_condition,
)
from lumiere.config import load_config

B, T, H, W = 2, 4, 3, 3


def _video(seed=0):
    return torch.rand(B, 3, T, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_t2v_is_all_zero():
    cm = t2v_condition(B, T, H, W)
    assert cm.shape == (B, 4, T, H, W) and not cm.any()


def test_i2v_puts_the_image_on_frame_zero_and_blanks_after():
    image = _video()[:, :, 0]
    cm = i2v_condition(image, T)
    c, m = cm[:, :3], cm[:, 3]
    assert torch.equal(c[:, :, 0], image)
    assert not c[:, :, 1:].any()
    assert torch.equal(m[:, 0], torch.ones(B, H, W)) and not m[:, 1:].any()


def test_inpaint_keeps_the_video_outside_the_region():
    video = _video()
    region = torch.zeros(B, H, W)
    region[:, 1, 1] = 1  # the centre pixel is to be filled, on every frame
    cm = inpaint_condition(video, region)
    c, m = cm[:, :3], cm[:, 3:]
    expected_m = torch.ones(B, 1, T, H, W)
    expected_m[..., 1, 1] = 0
    assert torch.equal(m, expected_m)
    assert torch.equal(c, video * expected_m)
    assert not c[..., 1, 1].any()


def test_inpaint_with_a_per_frame_region():
    video = _video()
    region = torch.zeros(B, T, H, W)
    region[:, 2:, 0, :] = 1  # top row from frame 2 on
    m = inpaint_condition(video, region)[:, 3]
    assert m[:, :2].all() and not m[:, 2:, 0].any() and m[:, 2:, 1:].all()


def test_cinemagraph_repeats_the_image_and_keeps_frame_zero_known():
    image = _video()[:, :, 0]
    region = torch.zeros(B, H, W)
    region[:, :, 2] = 1  # the right column moves
    cm = cinemagraph_condition(image, region, T)
    c, m = cm[:, :3], cm[:, 3]
    for t in range(T):
        assert torch.equal(c[:, :, t], image)  # C: the image on every frame
    assert m[:, 0].all()  # frame 0 entirely known
    assert m[:, 1:, :, :2].all() and not m[:, 1:, :, 2].any()  # later frames: known outside the region only


def test_extend_knows_the_first_k_frames():
    context = _video()[:, :, :2]
    cm = extend_condition(context, T)
    assert torch.equal(cm[:, :3, :2], context) and not cm[:, :3, 2:].any()
    assert cm[:, 3, :2].all() and not cm[:, 3, 2:].any()
    with pytest.raises(ValueError, match="context frames"):
        extend_condition(_video(), T)


def test_composite_keeps_known_pixels_exactly():
    video, generated = _video(0), _video(1)
    cm = i2v_condition(video[:, :, 0], T)
    out = composite(generated, cm)
    assert torch.equal(out[:, :, 0], video[:, :, 0]) and torch.equal(out[:, :, 1:], generated[:, :, 1:])


def test_random_training_conditions_are_consistent_with_their_target():
    video = _video()
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        cm = random_training_condition(video, g)
        target = composite(video, cm)
        c, m = cm[:, :3], cm[:, 3:]
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert torch.allclose(m * target, m * c)  # what M marks known is exactly the target there


def test_conditional_stunet_takes_seven_channels_and_starts_as_the_unconditional_model():
    cfg = load_config("tiny")
    torch.manual_seed(0)
    plain = perturb_(build_stunet(cfg))
    cond_cfg = load_config("tiny", ["stunet.conditional=true"])
    conditional = build_stunet(cond_cfg, plain.prior)
    conditional.load_state_dict(plain.state_dict(), strict=False)
    assert conditional.conv_in.in_channels == 7 and conditional.in_channels == 7
    x = torch.randn(1, 3, 8, 32, 32)
    cm = torch.randn(1, 4, 8, 32, 32)
    ctx, pooled = torch.randn(1, 16, 32), torch.randn(1, 32)
    t = torch.tensor([500])
    with torch.no_grad():
        same = conditional(torch.cat([x, cm], 1), t, ctx, pooled)
        assert torch.allclose(same, plain(x, t, ctx, pooled), atol=1e-5)  # condition channels start at zero
    with pytest.raises(ValueError, match="7 input channels"):
        conditional(x, t, ctx, pooled)
    assert "conv_in.weight" in dict(conditional.named_parameters())
    assert conditional.conv_in.weight.requires_grad  # trained with the temporal layers; the prior stays frozen
