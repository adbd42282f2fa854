"""Text encoder: open_clip towers, offline and seeded; distinct prompts get distinct features."""

import torch

from lumiere.text_encoder import TextEncoder


def test_seeded_random_init_is_reproducible_and_discriminative(tiny_cfg):
    a, b = TextEncoder(tiny_cfg.text), TextEncoder(tiny_cfg.text)
    prompts = ["a red square moving right", "a blue circle moving up", ""]
    ctx_a, pooled_a = a.encode_text(prompts)
    ctx_b, pooled_b = b.encode_text(prompts)
    d, e = tiny_cfg.text.dims()
    assert ctx_a.shape == (3, tiny_cfg.text.context_length, d) and pooled_a.shape == (3, e)
    assert torch.equal(ctx_a, ctx_b) and torch.equal(pooled_a, pooled_b)
    assert a.fingerprint() == b.fingerprint()
    assert not torch.allclose(pooled_a[0], pooled_a[1], atol=1e-3)


def test_other_seed_changes_fingerprint(tiny_cfg):
    from dataclasses import replace

    assert TextEncoder(replace(tiny_cfg.text, seed=1)).fingerprint() != TextEncoder(tiny_cfg.text).fingerprint()


def test_image_embedding(tiny_cfg):
    enc = TextEncoder(tiny_cfg.text)
    emb = enc.encode_image(torch.rand(2, 3, 48, 48))
    assert emb.shape == (2, tiny_cfg.text.embed_dim) and torch.isfinite(emb).all()
