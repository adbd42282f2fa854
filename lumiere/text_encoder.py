"""Text (and keyframe image) encoder: an open_clip CLIP model, frozen.

Axes: b batch, l tokens, d text width, e joint embedding width.

`encode_text` returns the per-token features the U-Net cross-attends to (b l d, the output of the text
transformer's final LayerNorm) and the pooled, projected embedding (b e) that joins the timestep embedding.
With `token_features: final_and_embeddings` each token's features also carry the token's own input embedding
(the word's row of the embedding table, before the transformer mixes it with its neighbours, layer-normed),
concatenated: d = 2 × width.

By default (`pretrained: null`) nothing is downloaded: the weights are randomly initialised from a fixed
seed, so ingestion, training and serving that share a config get the same encoder. `fingerprint()` is a short
hash of the embedding of a fixed string, stored with datasets and checkpoints to catch a mismatch. A real
pretrained tag (e.g. `ViT-B-32` + `laion2b_s34b_b79k`) or a local checkpoint path is a config option.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class TextEncoderConfig:
    arch: str = "custom"  # an open_clip architecture name (e.g. "ViT-B-32"), or "custom" for the fields below
    pretrained: str | None = None  # open_clip pretrained tag or local checkpoint path; None = seeded random init
    seed: int = 0
    # "custom" architecture: a small CLIP that trains and runs on CPU
    width: int = 64
    layers: int = 2
    heads: int = 2
    context_length: int = 16
    embed_dim: int = 64
    vision_width: int = 64
    vision_layers: int = 2
    vision_patch_size: int = 8
    image_size: int = 32
    # the per-token features: "final", the text transformer's output; "final_and_embeddings", also each token's
    # input embedding, concatenated. A frozen random-init transformer barely separates prompts that differ in one
    # word (pooled cosine "moving left" / "moving right" 0.93, benchmarks/RESULTS.md), while its embedding table
    # gives every word its own random vector: near-orthogonal codes, what the oracle direction code of run Q was
    # (measured, run U: the motion layers' plateau did not end sooner with them; off)
    token_features: Literal["final", "final_and_embeddings"] = "final"

    __pydantic_config__ = {"extra": "forbid"}

    def dims(self) -> tuple[int, int]:
        """(token feature width d, pooled embedding width e), without building the model."""
        copies = 2 if self.token_features == "final_and_embeddings" else 1
        if self.arch == "custom":
            return copies * self.width, self.embed_dim
        import open_clip

        mc = open_clip.get_model_config(self.arch)
        if mc is None:
            raise ValueError(
                f"unknown open_clip architecture {self.arch!r}; use 'custom' or one of open_clip.list_models()"
            )
        return copies * mc.get("text_cfg", {}).get("width", 512), mc["embed_dim"]


def _build_clip(cfg: TextEncoderConfig) -> tuple[nn.Module, object]:
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from open_clip.tokenizer import SimpleTokenizer

    if cfg.arch == "custom":
        if cfg.pretrained:
            raise ValueError("text.pretrained needs a named open_clip arch (e.g. ViT-B-32), not 'custom'")
        model = CLIP(
            embed_dim=cfg.embed_dim,
            vision_cfg=CLIPVisionCfg(
                layers=cfg.vision_layers,
                width=cfg.vision_width,
                head_width=max(8, cfg.vision_width // 2),
                patch_size=cfg.vision_patch_size,
                image_size=cfg.image_size,
            ),
            text_cfg=CLIPTextCfg(
                context_length=cfg.context_length, width=cfg.width, heads=cfg.heads, layers=cfg.layers
            ),
        )
        return model, SimpleTokenizer(context_length=cfg.context_length)
    model = open_clip.create_model(cfg.arch, pretrained=cfg.pretrained)
    return model, open_clip.get_tokenizer(cfg.arch)


class TextEncoder(nn.Module):
    """Frozen CLIP: prompts -> (token features b l d, pooled b e); images -> image embeddings b e."""

    def __init__(self, cfg: TextEncoderConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or TextEncoderConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # random init must be the same in ingestion, training and serving
            self.clip, self.tokenizer = _build_clip(cfg)
        self.clip.eval().requires_grad_(False)
        if not hasattr(self.clip, "ln_final"):
            raise ValueError(f"open_clip arch {cfg.arch!r} has no native text tower (ln_final); pick a CLIP arch")
        if cfg.token_features not in ("final", "final_and_embeddings"):
            raise ValueError(f"text.token_features must be 'final' or 'final_and_embeddings', got "
                             f"{cfg.token_features!r}")
        self._tokens: torch.Tensor | None = None
        self._embeddings: torch.Tensor | None = None
        self.clip.ln_final.register_forward_hook(self._keep_tokens)
        if cfg.token_features == "final_and_embeddings":
            self.clip.token_embedding.register_forward_hook(self._keep_embeddings)

    def _keep_tokens(self, module, inputs, output):
        self._tokens = output

    def _keep_embeddings(self, module, inputs, output):
        self._embeddings = output

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        pooled = self.clip.encode_text(tokens)
        context, self._tokens = self._tokens, None
        if self.cfg.token_features == "final_and_embeddings":
            # layer-normed (no affine) like the final features: the table's rows are ~0.02 in scale, which a
            # LayerNorm over the concatenation would otherwise leave ~50× smaller than the other half
            embeddings = nn.functional.layer_norm(self._embeddings.float(), self._embeddings.shape[-1:], eps=1e-9)
            context = torch.cat((context, embeddings.to(context.dtype)), dim=-1)  # b l (2 d)
            self._embeddings = None
        return context.float(), pooled.float()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images: b 3 h w in [0, 1], resized to the vision tower's input; returns b e (not normalised)."""
        size = self.clip.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        x = nn.functional.interpolate(images.float(), size=tuple(size), mode="bilinear", antialias=True)
        mean = torch.tensor(getattr(self.clip.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
        std = torch.tensor(getattr(self.clip.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
        x = (x - mean.view(1, 3, 1, 1).to(x)) / std.view(1, 3, 1, 1).to(x)
        return self.clip.encode_image(x.to(self.device)).float()

    def fingerprint(self) -> str:
        """Short hash identifying this encoder's weights through its output on a fixed prompt (and its token
        features, when they are not the default, so a dataset embedded one way is not trained on the other)."""
        _, pooled = self.encode_text(["lumiere fingerprint"])
        rounded = torch.round(pooled.double().cpu() * 1e4).to(torch.int64).numpy().tobytes()
        if self.cfg.token_features != "final":
            rounded += self.cfg.token_features.encode()
        return hashlib.sha256(rounded).hexdigest()[:16]
