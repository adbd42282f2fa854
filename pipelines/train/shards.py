"""Reading ingestion shards for training: manifest checks, and a Ray Data pipeline that decodes clips and
adapts them to the model config (random temporal crop to the config's frames, resize to its size), so tiny
configs train on the same 80-frame 128×128 shards as the paper-sized ones.

Why here, in the training room, and not shared with ingestion: this is the reading side of the shard format
only (the writing side and the schema are `pipelines/ingest/stage4_write.py`; the contract between the two is
docs/data-format.md and the manifest's `schema_version`, checked below). Keeping the two apart means an ingest
worker never imports the model config (diffusers, scipy) this module needs, and a training worker never imports
the decoders; neither job imports the other.

Axes of what the loader yields per batch: video uint8 `b t h w c`, context float32 `b l d`, pooled `b e`.
"""

from __future__ import annotations

import json

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

    With `high_res` (SSR training) the high-resolution copies are read (the plan holds only rows with one).
    `plan_index` passes through: the worker checks it trains on its plan in order."""
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
    return {"video": np.stack(videos), "context": np.stack(context).astype(np.float32), "pooled": np.stack(pooled),
            "plan_index": np.asarray(batch["plan_index"])[rows].astype(np.int64)}


def eligible_rows(num_rows: int, hr_size=None) -> np.ndarray:
    """The rows of a shard a model trains on: all, or for the SSR (given the `hr_size` column) those with a
    high-resolution copy (sources smaller than `hr_size` have none). Shared by the plan and the read stage."""
    if hr_size is None:
        return np.arange(num_rows)
    return np.flatnonzero(np.asarray(hr_size) > 0)


def shard_rows(manifest: dict, data_uri: str, kind: str = "stunet",
               options: StorageOptions | None = None) -> list[tuple[str, np.ndarray]]:
    """(shard path, the row indices a model kind trains on) per shard with any (`eligible_rows`; for the SSR this
    reads each shard's `hr_size` column)."""
    import pyarrow.parquet as pq

    fs, _ = storage.resolve(data_uri, options)
    out = []
    for uri, shard in zip(shard_uris(manifest, data_uri), manifest["shards"], strict=True):
        path = storage.resolve(uri, options)[1]
        hr = pq.read_table(path, columns=["hr_size"], filesystem=fs).column("hr_size") if kind == "ssr" else None
        rows = eligible_rows(int(shard["clips"]), hr)
        if len(rows):
            out.append((path, rows))
    if not out:
        raise LumiereError(f"{data_uri} has no clips a {kind} model can train on"
                           + (" (none has a high-resolution copy)" if kind == "ssr" else ""))
    return out


def rank_plan(shards: list[tuple[str, np.ndarray]], rank: int, world: int, rows: int, seed: int) -> list[dict]:
    """Worker `rank`'s reading plan for a whole run: units holding >= `rows` samples, each one visit of a shard.

    Epoch e visits the shards in a random order and each shard's rows in a random order, both seeded by
    (seed, e, …), so the plan is the same on every run of the same config. With at least `world` shards every
    worker reads whole shards (the k-th shard visited goes to worker k mod world), else each shard's rows are
    dealt out round-robin. A row's plan index is its place in its worker's sequence (`start` + offset in the
    unit); a checkpoint records how many each worker has trained on, which is the data position a resume
    continues from. Small datasets simply take several epochs: each visit of a clip gets a fresh random crop.

    A unit names its rows by how to recompute them (`unit_rows`), not by listing them, so a long run's plan
    stays small: {"path", "seed", "epoch", "shard", "first", "stride", "start", "count"}."""
    whole = len(shards) >= world
    units, start, counter, epoch = [], 0, 0, 0
    while start < rows:
        for k in np.random.default_rng([seed, epoch]).permutation(len(shards)):
            path, eligible = shards[k]
            if whole:
                first, stride, count = 0, 1, len(eligible) if counter % world == rank else 0
                counter += 1
            else:
                first, stride = (rank - counter) % world, world
                count = len(range(first, len(eligible), stride))
                counter += len(eligible)
            if count:
                units.append({"path": path, "seed": seed, "epoch": epoch, "shard": int(k), "first": first,
                              "stride": stride, "start": start, "count": count})
                start += count
        epoch += 1
    return units


def unit_rows(unit: dict, eligible: np.ndarray) -> np.ndarray:
    """The shard rows of a plan unit, in order: its shard's eligible rows permuted by (seed, epoch, shard),
    every `stride`-th from `first`."""
    order = np.random.default_rng([int(unit["seed"]), int(unit["epoch"]), int(unit["shard"])]).permutation(eligible)
    return order[int(unit["first"]) :: int(unit["stride"])].astype(np.int64)


class DataPosition:
    """A small Ray actor holding the plan index training continues from (rows each worker has trained on).

    The workers set it after restoring a checkpoint and before they iterate; the read stage asks it, so rows
    before it are never read or decoded. It lives as long as the driver, across worker-group restarts."""

    def __init__(self):
        self.position = 0

    def set(self, position: int) -> None:
        self.position = int(position)

    def get(self) -> int:
        return self.position


def read_plan_units(batch: dict[str, np.ndarray], filesystem, columns: list[str], position):
    """Plan units -> their shard rows (a pyarrow Table with `plan_index`), from the data position on (a Ray Data
    task: the position actor is asked once per batch of units)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    skip = ray.get(position.get.remote()) if position is not None else 0
    tables = []
    for i in range(len(batch["path"])):
        unit = {k: v[i] for k, v in batch.items()}
        index = int(unit["start"]) + np.arange(int(unit["count"]))
        keep = index >= skip
        if not keep.any():
            continue
        table = pq.read_table(str(unit["path"]), columns=columns, filesystem=filesystem)
        rows = unit_rows(unit, eligible_rows(table.num_rows, table.column("hr_size") if "hr_size" in columns else None))
        if len(rows) != len(index):
            raise LumiereError(f"{unit['path']} no longer holds the rows the data plan was made from "
                               f"({len(rows)} vs {len(index)}): the shards changed during the run")
        table = table.take(pa.array(rows[keep]))
        tables.append(table.append_column("plan_index", pa.array(index[keep], pa.int64())))
    if not tables:
        return pa.table({**{c: pa.array([], type=t) for c, t in _schema(filesystem, batch, columns)},
                         "plan_index": pa.array([], pa.int64())})
    return pa.concat_tables(tables)


def _schema(filesystem, batch, columns):
    import pyarrow.parquet as pq

    schema = pq.read_schema(str(batch["path"][0]), filesystem=filesystem)
    return [(c, schema.field(c).type) for c in columns]


def clip_datasets(data_uri: str, manifest: dict, cfg: LumiereConfig, world: int, rows_per_worker: int,
                  position=None, options: StorageOptions | None = None, kind: str = "stunet") -> dict:
    """One Ray Dataset of model-ready clips per worker ({"train_rank{r}": ds}): its plan units -> shard rows from
    the data position on (tasks) -> decode + crop + resize (tasks) -> rows in plan order (the trainer runs these
    datasets unsplit with preserve_order, so what a worker trains on is fixed by the plan alone)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    fs, _ = storage.resolve(data_uri, options)
    shards = shard_rows(manifest, data_uri, kind, options)
    columns = HR_COLUMNS if kind == "ssr" else COLUMNS
    frames, size = clip_shape(cfg, kind)
    kwargs = {"frames": frames, "size": size, "token_shape": tuple(manifest["text_encoder"]["token_shape"]),
              "high_res": kind == "ssr"}
    out = {}
    for rank in range(world):
        units = rank_plan(shards, rank, world, rows_per_worker, cfg.train.seed)
        ds = ray.data.from_items(units, override_num_blocks=min(len(units), 256))
        ds = ds.map_batches(read_plan_units, batch_size=1, num_cpus=0.25,
                            fn_kwargs={"filesystem": fs, "columns": columns, "position": position})
        out[f"train_rank{rank}"] = ds.map_batches(load_clip_batch, fn_kwargs=kwargs, batch_size=16, num_cpus=0.25)
    return out
