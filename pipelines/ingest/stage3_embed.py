"""Stage 3 of ingestion, a Ray Data actor pool (GPU when configured): the open_clip text embedding of each
accepted clip's caption, the image embedding of its keyframe, their CLIP score (and the low_clip_score filter).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .config import IngestConfig
from .stage4_write import batch_seconds


class CaptionEmbedder:
    """Loads the open_clip encoder once per actor; adds text/image embeddings and the CLIP score."""

    def __init__(self, cfg: IngestConfig):
        from lumiere.text_encoder import TextEncoder

        self.cfg = cfg
        device = "cuda" if cfg.embed_num_gpus > 0 and torch.cuda.is_available() else "cpu"
        encoder = TextEncoder(cfg.text_encoder())
        # stamped on every part written from these embeddings; taken on the CPU, as the driver takes the manifest's
        # (a GPU's rounding could move the fingerprint's last digit)
        self.fingerprint = encoder.fingerprint()
        self.encoder = encoder.to(device)
        with torch.no_grad():
            self.dim = int(self.encoder.encode_text([""])[1].shape[1])  # text and image share CLIP's embedding space

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        n = len(batch["clip_id"])
        ok = np.array([s == "ok" for s in batch["status"]])
        tokens = np.empty(n, dtype=object)
        # (n, dim) float32, zeros for rows that are not clips: one tensor column Arrow takes as it is (an object
        # array of arrays and Nones made Ray fall back to pickling the column, with a warning per batch)
        pooled = np.zeros((n, self.dim), dtype=np.float32)
        image = np.zeros((n, self.dim), dtype=np.float32)
        score = np.full(n, np.nan, dtype=np.float32)  # NaN: not a clip, no score (null in the parts)
        tokens[:] = b""
        if ok.any():
            idx = np.flatnonzero(ok)
            context, text = self.encoder.encode_text([str(batch["caption"][i]) for i in idx])
            size = self.cfg.size
            keyframes = torch.stack([
                torch.from_numpy(np.frombuffer(batch["keyframe"][i], dtype=np.uint8).reshape(size, size, 3).copy())
                for i in idx
            ]).permute(0, 3, 1, 2).float() / 255.0
            img = self.encoder.encode_image(keyframes)
            cos = torch.nn.functional.cosine_similarity(text, img, dim=-1)
            for j, i in enumerate(idx):
                tokens[i] = context[j].to(torch.float16).cpu().numpy().tobytes()
                pooled[i] = text[j].cpu().numpy().astype(np.float32)
                image[i] = img[j].cpu().numpy().astype(np.float32)
                score[i] = float(cos[j])
                if self.cfg.min_clip_score is not None and score[i] < self.cfg.min_clip_score:
                    batch["status"][i] = "reject"
                    batch["reason"][i] = "low_clip_score"
                    batch["detail"][i] = f"CLIP score {score[i]:.3f} < min_clip_score={self.cfg.min_clip_score}"
        batch.update(text_tokens=tokens, text_pooled=pooled, image_embedding=image, clip_score=score,
                     encoder_fingerprint=np.full(n, self.fingerprint, dtype=object),
                     **batch_seconds("embed", n, started))
        return batch
