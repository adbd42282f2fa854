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


def test_token_embeddings_give_each_word_its_own_code(tiny_cfg):
    """`final_and_embeddings` appends each token's own (normalised) embedding to its final features: prompts that
    differ in one word are nearly as alike as before in the transformer's half, while at that word's position the
    embedding half is a different random vector (near-orthogonal), and the other positions' halves are equal."""
    from dataclasses import replace

    base = TextEncoder(tiny_cfg.text)
    both = TextEncoder(replace(tiny_cfg.text, token_features="final_and_embeddings"))
    prompts = ["a red square moving left", "a red square moving right"]
    final, pooled = base.encode_text(prompts)
    ctx, pooled_both = both.encode_text(prompts)
    d = tiny_cfg.text.width
    assert ctx.shape[-1] == 2 * d == both.cfg.dims()[0]
    assert torch.equal(ctx[..., :d], final) and torch.equal(pooled_both, pooled)  # the first half is unchanged
    emb = ctx[..., d:]
    differs = (emb[0] - emb[1]).abs().amax(dim=-1) > 1e-6
    assert differs.sum() == 1  # only the direction word's position
    word = int(differs.nonzero())
    cos = torch.nn.functional.cosine_similarity(emb[0, word], emb[1, word], dim=0)
    assert abs(float(cos)) < 0.5 and torch.allclose(emb.pow(2).mean(-1), torch.ones(2, emb.shape[1]), atol=1e-3)
    # a dataset embedded one way is not trained on with the other: the fingerprints differ
    assert both.fingerprint() != base.fingerprint()
