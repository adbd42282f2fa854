"""Stage 1 of ingestion, on the driver: list the video files under a URI and attach their captions (a sidecar
.jsonl/.csv/.parquet with path,caption, or a .txt/.json beside each video). Plain functions, testable without Ray.
"""

from __future__ import annotations

import csv
import io
import json
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


def _caption_beside(video_uri: str, files: set[str], options: StorageOptions) -> str | None:
    stem = video_uri.rsplit(".", 1)[0]
    if stem + ".txt" in files:
        return storage.read_bytes(stem + ".txt", options).decode("utf-8").strip()
    if stem + ".json" in files:
        doc = json.loads(storage.read_bytes(stem + ".json", options))
        return str(doc.get("caption", "")).strip() if isinstance(doc, dict) else None
    return None


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
    files, skipped = [], 0
    for uri, size in listing:
        if not uri.lower().endswith(tuple(e.lower() for e in cfg.extensions)):
            skipped += 1
            continue
        rel = uri[len(root) + 1:] if uri.startswith(root + "/") else PurePosixPath(uri).name
        caption = sidecar.get(rel, sidecar.get(uri, sidecar.get(PurePosixPath(uri).name)))
        if caption is None:
            caption = _caption_beside(uri, names, options)
        files.append({"source": uri, "size": int(size), "caption": caption or "",
                      "has_caption": bool(caption)})
    return files, skipped
