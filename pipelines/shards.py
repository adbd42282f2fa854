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
HR_COLUMNS = ["clip_id", "hr_frames", "hr_size", "frames_format", "num_frames", "text_tokens", "text_pooled"]


def clip_shape(cfg: LumiereConfig, kind: str) -> tuple[int, int]:
    """(frames, size) a model kind trains on: the SSR sees `ssr.window`-frame windows at the high resolution."""
    if kind == "ssr":
        return cfg.ssr.window, cfg.video.size * cfg.ssr.scale
    return cfg.video.frames, cfg.video.size


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


def check_manifest(manifest: dict, cfg: LumiereConfig, data_uri: str, text_fingerprint: str | None,
                   kind: str = "stunet") -> None:
    """Every problem the trainer can see before starting: a clear one-line error."""
    version = manifest.get("schema_version")
    if version != SUPPORTED_SCHEMA:
        raise LumiereError(f"{data_uri} has shard schema version {version!r}; this trainer reads version "
                           f"{SUPPORTED_SCHEMA} (re-ingest with this version of lumiere)")
    if not manifest.get("shards") or not manifest.get("clips"):
        raise LumiereError(f"{data_uri} has no clips (0 shards): nothing to train on; see its report.json")
    frames, size = clip_shape(cfg, kind)
    if manifest.get("clip_frames", 0) < frames:
        key = "ssr.window" if kind == "ssr" else "video.frames"
        raise LumiereError(f"{data_uri} has {manifest.get('clip_frames')}-frame clips but the config needs "
                           f"{key}={frames}")
    if kind == "ssr" and (manifest.get("hr_size") or 0) < size:
        raise LumiereError(f"{data_uri} keeps high-resolution copies at {manifest.get('hr_size') or 'no'} pixels but "
                           f"the SSR trains at {size} (video.size × ssr.scale); re-ingest with --set hr_size={size} "
                           "or higher")
    expected = manifest.get("text_encoder", {}).get("fingerprint")
    if text_fingerprint and expected and expected != text_fingerprint:
        raise LumiereError(f"{data_uri} was embedded with another text encoder (fingerprint {expected}) than "
                           f"config '{cfg.name}' uses ({text_fingerprint}); set the same text.* keys, or re-ingest "
                           "with --set encoder_from=<config>")


def shard_uris(manifest: dict, data_uri: str) -> list[str]:
    return [storage.join(data_uri, s["path"]) for s in manifest["shards"]]


def check_shard_files(manifest: dict, data_uri: str, options: StorageOptions | None = None) -> None:
    """Every shard the manifest lists exists (one listing call per filesystem), else a one-line error."""
    import pyarrow.fs as pafs

    uris = shard_uris(manifest, data_uri)
    fs, _ = storage.resolve(data_uri, options)
    infos = fs.get_file_info([storage.resolve(u, options)[1] for u in uris])
    missing = [u for u, info in zip(uris, infos, strict=True) if info.type == pafs.FileType.NotFound]
    if missing:
        raise LumiereError(f"{data_uri}/manifest.json lists {len(missing)} of {len(uris)} shard files that do not "
                           f"exist (e.g. {missing[0]}): the shards were moved or deleted; re-run `lumiere ingest` "
                           "into this output to rebuild them")


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
                    token_shape: tuple[int, int], high_res: bool = False) -> dict[str, np.ndarray]:
    """A batch of shard rows -> model-ready arrays (a Ray Data task, so decoding stays out of the loop).

    With `high_res` (SSR training) the high-resolution copies are read (`clip_dataset` keeps only rows with one)."""
    rng = np.random.default_rng()
    if high_res:
        rows = [i for i in range(len(batch["clip_id"])) if int(batch["hr_size"][i]) > 0]
        data = [(batch["hr_frames"][i], int(batch["hr_size"][i]), int(batch["hr_size"][i])) for i in rows]
    else:
        rows = list(range(len(batch["clip_id"])))
        data = [(batch["frames"][i], int(batch["height"][i]), int(batch["width"][i])) for i in rows]
    videos = [
        _decode_clip(d, batch["frames_format"][i], int(batch["num_frames"][i]), h, w, frames, size, rng)
        for i, (d, h, w) in zip(rows, data, strict=True)
    ]
    context = [np.frombuffer(batch["text_tokens"][i], np.float16).reshape(token_shape) for i in rows]
    pooled = [np.asarray(batch["text_pooled"][i], dtype=np.float32) for i in rows]
    return {"video": np.stack(videos), "context": np.stack(context).astype(np.float32), "pooled": np.stack(pooled)}


def _has_high_res(row: dict) -> bool:
    return int(row["hr_size"]) > 0


def repeat_and_shuffle(block: dict[str, np.ndarray], times: int, seed: int | None = None) -> dict[str, np.ndarray]:
    """A block of shard rows, each `times` times, in a fresh random order (a Ray Data task, one block at a time).

    Shuffled so a training batch draws different clips: with `times` consecutive copies of a row, a batch is one
    clip under several crops (measured on the demo's 120 clips, 4,096-row passes, batches of 8: 1.2 distinct
    clips per batch with consecutive copies, 7.8 shuffled)."""
    n = len(next(iter(block.values())))
    order = np.random.default_rng(seed).permutation(np.tile(np.arange(n), times))
    return {k: v[order] for k, v in block.items()}


def clip_dataset(data_uri: str, manifest: dict, cfg: LumiereConfig, options: StorageOptions | None = None,
                 min_pass_clips: int = 4096, kind: str = "stunet"):
    """A Ray Dataset of model-ready clips: shards -> decode + crop + resize (tasks) -> rows."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    fs, _ = storage.resolve(data_uri, options)
    paths = [storage.resolve(u, options)[1] for u in shard_uris(manifest, data_uri)]
    columns = HR_COLUMNS if kind == "ssr" else COLUMNS
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=columns, shuffle="files")  # new shard order each pass
    if kind == "ssr":  # clips from sources smaller than hr_size have no high-resolution copy
        ds = ds.filter(_has_high_res, num_cpus=0.25)
    # a small dataset is repeated within a pass (each copy gets fresh random crops), so a pass is long
    # enough that the per-pass start-up of the streaming pipeline does not dominate: on the demo's 120 clips
    # (2 workers, t2i small, 2 cores) passes of 360 rows trained at ~31 samples/s, passes of 4,096 at ~100
    repeats = math.ceil(min_pass_clips / max(1, manifest["clips"]))
    ds = ds.map_batches(repeat_and_shuffle, fn_kwargs={"times": repeats}, batch_size=None, num_cpus=0.25)
    frames, size = clip_shape(cfg, kind)
    kwargs = {"frames": frames, "size": size, "token_shape": tuple(manifest["text_encoder"]["token_shape"]),
              "high_res": kind == "ssr"}
    return ds.map_batches(load_clip_batch, fn_kwargs=kwargs, batch_size=16, num_cpus=0.25)
