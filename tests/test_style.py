"""Stylization by interpolating the prior's weights: endpoints exact, temporal layers untouched."""

import numpy as np
import pytest
import torch

from conftest import perturb_
from lumiere.checkpoint import build_stunet
from lumiere.config import load_config
from lumiere.diffusion import Conditioning
from lumiere.errors import LumiereError
from lumiere.style import fit_style, interpolate_prior, load_style, prior_fingerprint, save_style


@pytest.fixture(scope="module")
def fitted(tiny_cfg):
    torch.manual_seed(0)
    stunet = perturb_(build_stunet(tiny_cfg)).eval()
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[0, :, :16] = (200, 40, 40)  # two flat "style" pictures
    images[1, 8:24, 8:24] = (40, 40, 200)
    cond = Conditioning(torch.zeros(1, 16, 32), torch.zeros(1, 32))
    style = fit_style(stunet.prior, images, cond, tiny_cfg.diffusion, steps=3, lr=1e-2, batch_size=2)
    return stunet, style


def _out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(1, 3, 8, 32, 32, generator=g), torch.randn(1, 16, 32, generator=g)
    pooled = torch.randn(1, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([400]), ctx, pooled)


def test_fitting_changes_the_prior_only(fitted):
    stunet, style = fitted
    assert set(style) == set(stunet.prior.state_dict())
    changed = [k for k, v in stunet.prior.state_dict().items() if not torch.equal(v, style[k])]
    assert changed, "a few fine-tuning steps must move the prior's weights"


def test_alpha_zero_is_the_original_prior_and_alpha_one_the_style(fitted):
    stunet, style = fitted
    original = {k: v.clone() for k, v in stunet.state_dict().items()}
    at0 = interpolate_prior(stunet, style, 0.0)
    at1 = interpolate_prior(stunet, style, 1.0)
    for k, v in at0.prior.state_dict().items():
        assert torch.equal(v, original[f"prior.{k}"])
    for k, v in at1.prior.state_dict().items():
        assert torch.equal(v, style[k])
    assert torch.equal(_out(at0), _out(stunet))
    half = interpolate_prior(stunet, style, 0.5)
    k = next(k for k in style if not torch.equal(style[k], original[f"prior.{k}"]))
    assert torch.allclose(half.prior.state_dict()[k], (style[k] + original[f"prior.{k}"]) / 2, atol=1e-6)
    assert not torch.equal(_out(at1), _out(stunet))


def test_temporal_weights_are_identical_before_and_after(fitted):
    stunet, style = fitted
    before = {n: p.clone() for n, p in stunet.named_parameters() if not n.startswith("prior.")}
    styled = interpolate_prior(stunet, style, 0.8)
    after = {n: p for n, p in styled.named_parameters() if not n.startswith("prior.")}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(p, stunet.state_dict()[n]) for n, p in before.items())  # the source is untouched


def test_style_round_trip_and_base_check(fitted, tmp_path):
    stunet, style = fitted
    save_style(tmp_path / "style", style, {"base_fingerprint": prior_fingerprint(stunet.prior)})
    state, meta = load_style(tmp_path / "style")
    assert all(torch.equal(state[k], style[k]) for k in style)
    interpolate_prior(stunet, state, 0.7, meta["base_fingerprint"])
    other = build_stunet(load_config("tiny"))
    with pytest.raises(LumiereError, match="another base model"):
        interpolate_prior(other, state, 0.7, meta["base_fingerprint"])
    with pytest.raises(LumiereError, match=r"\[0, 1\]"):
        interpolate_prior(stunet, state, 1.5)
    with pytest.raises(LumiereError, match="not a style directory"):
        load_style(tmp_path)
