"""Reading ingestion shards for training: manifest checks, and a Ray Data pipeline that decodes clips and
adapts them to the model config (random temporal crop to the config's frames, resize to its size), so tiny
configs train on the same 80-frame 128×128 shards as the paper-sized ones.

Axes of what the loader yields per batch: video uint8 `b t h w c`, context float32 `b l d`, pooled `b e`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from lumiere import storage
from lumiere.config import LumiereConfig
from lumiere.errors import LumiereError
from lumiere.storage import StorageOptions
from lumiere.video import decode_mp4_bytes

SUPPORTED_SCHEMA = 1
COLUMNS = ["clip_id", "frames", "frames_format", "num_frames", "height", "width", "text_tokens", "text_pooled"]


def read_manifest(data_uri: str, options: StorageOptions | None = None) -> dict:
    uri = storage.join(data_uri, "manifest.json")
    try:
        manifest = json.loads(storage.read_bytes(uri, options))
    except FileNotFoundError:
        raise LumiereError(f"no manifest.json in {data_uri}: not a finished `lumiere ingest` output "
                           "(re-run the ingest job to finish it)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise LumiereError(f"cannot read {uri}: {e}") from None
    return manifest


def check_manifest(manifest: dict, cfg: LumiereConfig, data_uri: str, text_fingerprint: str | None) -> None:
    """Every problem the trainer can see before starting: a clear one-line error."""
    version = manifest.get("schema_version")
    if version != SUPPORTED_SCHEMA:
        raise LumiereError(f"{data_uri} has shard schema version {version!r}; this trainer reads version "
                           f"{SUPPORTED_SCHEMA} (re-ingest with this version of lumiere)")
    if not manifest.get("shards") or not manifest.get("clips"):
        raise LumiereError(f"{data_uri} has no clips (0 shards): nothing to train on; see its report.json")
    if manifest.get("clip_frames", 0) < cfg.video.frames:
        raise LumiereError(f"{data_uri} has {manifest.get('clip_frames')}-frame clips but the config needs "
                           f"video.frames={cfg.video.frames}")
    expected = manifest.get("text_encoder", {}).get("fingerprint")
    if text_fingerprint and expected and expected != text_fingerprint:
        raise LumiereError(f"{data_uri} was embedded with another text encoder (fingerprint {expected}) than "
                           f"config '{cfg.name}' uses ({text_fingerprint}); set the same text.* keys, or re-ingest "
                           "with --set encoder_from=<config>")


def shard_uris(manifest: dict, data_uri: str) -> list[str]:
    return [storage.join(data_uri, s["path"]) for s in manifest["shards"]]


def _decode_clip(data: bytes, fmt: str, t: int, h: int, w: int, frames: int, size: int,
                 rng: np.random.Generator) -> np.ndarray:
    video = decode_mp4_bytes(data) if fmt == "mp4" else np.frombuffer(data, np.uint8).reshape(t, h, w, 3)
    start = int(rng.integers(0, len(video) - frames + 1))  # random temporal crop
    video = video[start:start + frames]
    if video.shape[1:3] != (size, size):
        x = rearrange(torch.from_numpy(np.ascontiguousarray(video)).float(), "t h w c -> t c h w")
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        video = rearrange(x.round().clamp(0, 255).to(torch.uint8), "t c h w -> t h w c").numpy()
    return video


def load_clip_batch(batch: dict[str, np.ndarray], frames: int, size: int,
                    token_shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """A batch of shard rows -> model-ready arrays (a Ray Data task, so decoding stays out of the loop)."""
    rng = np.random.default_rng()
    videos = np.stack([
        _decode_clip(batch["frames"][i], batch["frames_format"][i], int(batch["num_frames"][i]),
                     int(batch["height"][i]), int(batch["width"][i]), frames, size, rng)
        for i in range(len(batch["clip_id"]))
    ])
    context = np.stack([np.frombuffer(b, np.float16).reshape(token_shape) for b in batch["text_tokens"]])
    pooled = np.stack([np.asarray(p, dtype=np.float32) for p in batch["text_pooled"]])
    return {"video": videos, "context": context.astype(np.float32), "pooled": pooled}


def _repeat_row(row: dict, times: int) -> list[dict]:
    return [row] * times


def clip_dataset(data_uri: str, manifest: dict, cfg: LumiereConfig, options: StorageOptions | None = None,
                 min_pass_clips: int = 256):
    """A Ray Dataset of model-ready clips: shards -> decode + crop + resize (tasks) -> rows."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    fs, _ = storage.resolve(data_uri, options)
    paths = [storage.resolve(u, options)[1] for u in shard_uris(manifest, data_uri)]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=COLUMNS)
    # a small dataset is read several times per pass (each copy gets fresh random crops), so a pass is long
    # enough that the per-pass start-up of the streaming pipeline does not dominate
    repeats = math.ceil(min_pass_clips / max(1, manifest["clips"]))
    if repeats > 1:
        ds = ds.flat_map(_repeat_row, fn_kwargs={"times": repeats}, num_cpus=0.25)
    kwargs = {"frames": cfg.video.frames, "size": cfg.video.size,
              "token_shape": tuple(manifest["text_encoder"]["token_shape"])}
    return ds.map_batches(load_clip_batch, fn_kwargs=kwargs, batch_size=16, num_cpus=0.25)
