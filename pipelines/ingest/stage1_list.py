"""Stage 1 of ingestion, on the driver: list the video files under a URI and attach their captions (a sidecar
.jsonl/.csv/.parquet with path,caption, or a .txt/.json beside each video); then (Ray tasks, `content_hash`) the
SHA-256 of each file's bytes, which `mark_duplicates` turns into exact-duplicate rejects. Plain functions, testable
without Ray.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

import pyarrow.parquet as pq

from lumiere import storage
from lumiere.storage import StorageOptions

from .config import IngestConfig


def _read_sidecar(uri: str, options: StorageOptions) -> dict[str, str]:
    data = storage.read_bytes(uri, options)
    name = uri.lower()
    if name.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data), columns=["path", "caption"])
        rows = table.to_pylist()
    elif name.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    elif name.endswith((".jsonl", ".json")):
        rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    else:
        raise ValueError(f"captions file {uri} must be .jsonl, .csv or .parquet")
    try:
        return {str(r["path"]): str(r["caption"] or "") for r in rows}
    except KeyError as e:
        raise ValueError(f"captions file {uri} needs columns 'path' and 'caption' (missing {e})") from None


def _caption_beside(video_uri: str, files: set[str], options: StorageOptions) -> tuple[str | None, str | None]:
    """(caption, None), or (None, why the caption file beside the video cannot be used): a bad sidecar is that
    one video's reject (`bad_caption`), never the whole run's failure."""
    stem = video_uri.rsplit(".", 1)[0]
    for ext in (".txt", ".json"):
        if stem + ext not in files:
            continue
        name = PurePosixPath(stem + ext).name
        try:
            data = storage.read_bytes(stem + ext, options)
        except OSError as e:
            return None, f"cannot read {name}: {e}"
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"{name} is not UTF-8 text (byte {e.start}); re-save it as UTF-8"
        if ext == ".txt":
            return text.strip(), None
        try:
            doc = json.loads(text)
        except ValueError as e:
            return None, f"{name} is not valid JSON ({e}); it must be an object with a \"caption\" string"
        if not isinstance(doc, dict) or not isinstance(doc.get("caption", ""), str):
            return None, f"{name} must be a JSON object with a \"caption\" string"
        return doc.get("caption", "").strip(), None
    return None, None


def list_inputs(input_uri: str, captions_uri: str | None, cfg: IngestConfig,
                options: StorageOptions) -> tuple[list[dict], int]:
    """The video files under `input_uri` with their captions; returns (files, number of non-video files)."""
    listing = storage.list_files(input_uri, options)
    names = {u for u, _ in listing}
    sidecar = _read_sidecar(captions_uri, options) if captions_uri else {}
    # the listing's URIs are resolved (a local path made absolute), so the root they are relative to must be too:
    # with the raw argument, a relative --input matched no sidecar path and every file was "no_caption"
    resolved = storage.resolve(input_uri, options)[1]
    root = ("s3://" + resolved if storage.is_s3(input_uri) else resolved).rstrip("/")
    videos = [(u, s) for u, s in listing if u.lower().endswith(tuple(e.lower() for e in cfg.extensions))]
    skipped = len(listing) - len(videos)
    captions = []
    for uri, _ in videos:
        rel = uri[len(root) + 1:] if uri.startswith(root + "/") else PurePosixPath(uri).name
        captions.append(sidecar.get(rel, sidecar.get(uri, sidecar.get(PurePosixPath(uri).name))))
    # the captions beside the videos: one GET each, so many in flight (a serial loop was minutes per 10k on S3)
    need = [i for i, c in enumerate(captions) if c is None]
    errors: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=32) as pool:
        found = pool.map(lambda i: _caption_beside(videos[i][0], names, options), need)
        for i, (caption, error) in zip(need, found, strict=True):
            captions[i] = caption
            if error:
                errors[i] = error
    files = []
    for i, ((uri, size), caption) in enumerate(zip(videos, captions, strict=True)):
        row = {"source": uri, "size": int(size), "caption": caption or "", "has_caption": bool(caption),
               "caption_error": errors.get(i, "")}
        files.append(row)
    return files, skipped


_HASH_BLOCK = 8 * 2**20


def content_hash(row: dict, options: StorageOptions, max_file_bytes: int) -> dict:
    """row + {"content_hash": hex SHA-256 of the file's bytes}, read in blocks (memory: one block). A file that
    cannot be read, or that is over max_file_bytes (its reject says so later), gets "" and is never a duplicate."""
    if row["size"] > max_file_bytes:
        return {**row, "content_hash": ""}
    digest = hashlib.sha256()
    try:
        fs, path = storage.resolve(row["source"], options)
        with fs.open_input_stream(path) as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
    except OSError:
        return {**row, "content_hash": ""}
    return {**row, "content_hash": digest.hexdigest()}


def probe_duration(uri: str, options: StorageOptions) -> float:
    """The video's duration in seconds from its container (PyAV; on S3 through a random-access file, so only the
    header is fetched, by range), or 0.0 when it cannot be read (the decode task then rejects the file)."""
    import av

    try:
        fs, path = storage.resolve(uri, options)
        with fs.open_input_file(path) as f, av.open(f) as container:
            if not container.streams.video:
                return 0.0
            s = container.streams.video[0]
            if s.duration and s.time_base:
                return float(s.duration * s.time_base)
            return float(container.duration or 0) / 1e6
    except Exception:  # noqa: BLE001 - a broken file is the decode task's reject, not the listing's failure
        return 0.0


def inspect_file(row: dict, options: StorageOptions, max_file_bytes: int, hash_bytes: bool) -> dict:
    """row + {"duration_s"} (and {"content_hash"} with `hash_bytes`): the Ray tasks that look at every input
    before decoding, so long files can be cut into time ranges and duplicates marked."""
    out = content_hash(row, options, max_file_bytes) if hash_bytes else {**row, "content_hash": ""}
    out["duration_s"] = probe_duration(row["source"], options) if row["size"] <= max_file_bytes else 0.0
    return out


def split_into_ranges(row: dict, cfg: IngestConfig) -> list[dict]:
    """A file longer than `cfg.range_seconds` -> one row per time range (`range_index`, `ranges`, and the output
    frames [range_first, range_end) at `cfg.fps`; the last range runs to the end of the stream whatever the probed
    duration says), each its own decode task; otherwise the row itself (one range). Files rejected before
    decoding (duplicate, bad or missing caption, too large) stay one task."""
    duration, range_seconds, fps = float(row.get("duration_s") or 0.0), cfg.range_seconds, cfg.fps
    whole_file_reject = (row.get("duplicate_of") or row.get("caption_error")
                         or (not row.get("has_caption", True) and cfg.missing_caption == "reject"))
    if duration <= range_seconds or whole_file_reject:
        return [{**row, "range_index": 0, "ranges": 1, "range_first": 0, "range_end": -1}]
    per = max(1, int(round(range_seconds * fps)))
    count = math.ceil(duration * fps / per)
    return [{**row, "range_index": k, "ranges": count, "range_first": k * per,
             "range_end": (k + 1) * per if k < count - 1 else -1} for k in range(count)]


def mark_duplicates(todo: list[dict], kept: dict[str, str]) -> int:
    """Give each file whose content hash is already kept `duplicate_of` = the kept file's URI. `kept` (hash ->
    URI) starts with the files an earlier run committed as originals, so a new file never displaces one; among
    new files the first in listing order is kept, preferring one with a usable caption. Updates `kept`; returns
    the number of duplicates marked."""
    marked = 0
    # a copy that can be used (a caption, no bad caption file) is kept before one that would be rejected anyway
    for row in sorted(todo, key=lambda r: (not r.get("has_caption") or bool(r.get("caption_error")), r["source"])):
        h = row.get("content_hash")
        if not h:
            continue
        if h in kept and kept[h] != row["source"]:
            row["duplicate_of"] = kept[h]
            marked += 1
        else:
            kept.setdefault(h, row["source"])
    return marked
