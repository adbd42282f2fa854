"""Contact sheets of an ingestion: one PNG of accepted clips and one per reject reason, so a data engineer sees at a
glance what a filter threw away (and whether a threshold is wrong) without opening a shard.

Each candidate that has frames carries a `thumb` (stage 2): a JPEG strip of its first, middle and last frame at
64x64 (~4 KB). A sheet shows up to `contact_sheet_tiles` candidates per kind, a deterministic pseudo-random sample
(ordered by a hash of the clip id, so it spreads over files instead of taking one file's clips), each tile
labelled with its file, time and the caption or the reject's detail. Files rejected before decoding (unreadable,
no caption, duplicates, …) have no frames: their tile is grey, with the label. Finalize reads the thumbnails of
the sampled candidates only, from the parts that hold them.
"""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from pathlib import PurePosixPath

import numpy as np
import torch
from einops import rearrange

from lumiere import storage
from lumiere.storage import StorageOptions

THUMB = 64  # side of one frame of a strip
_TILE_W, _TEXT_H, _PAD = 3 * THUMB, 26, 4
_COLS = 4


def thumb_strip(thumbs: torch.Tensor) -> bytes:
    """t c 64 64 float thumbnails (0-255) of a clip or shot -> JPEG bytes of its first, middle and last frame side
    by side (fewer when it has fewer frames)."""
    if len(thumbs) == 0:
        return b""
    picks = sorted({0, len(thumbs) // 2, len(thumbs) - 1})
    strip = rearrange(thumbs[picks].clamp(0, 255).round().to(torch.uint8), "k c h w -> h (k w) c").numpy()
    from PIL import Image

    sink = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(strip)).save(sink, format="JPEG", quality=80)
    return sink.getvalue()


def _sample(ids: list[str], n: int) -> list[str]:
    return sorted(ids, key=lambda c: hashlib.sha1(c.encode()).digest())[:n]


def render_sheet(title: str, tiles: list[tuple[bytes, str, str]]) -> bytes:
    """PNG bytes of a grid of tiles (thumbnail strip or b"", two label lines) under a title line."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    rows = max(1, -(-len(tiles) // _COLS))
    tile_h = THUMB + _TEXT_H + _PAD
    sheet = Image.new("RGB", (_COLS * (_TILE_W + _PAD) + _PAD, 18 + rows * tile_h + _PAD), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    draw.text((_PAD, 3), title, fill=(235, 235, 235), font=font)
    for i, (thumb, line1, line2) in enumerate(tiles):
        x, y = _PAD + (i % _COLS) * (_TILE_W + _PAD), 18 + (i // _COLS) * tile_h
        if thumb:
            strip = Image.open(io.BytesIO(thumb)).convert("RGB")
            sheet.paste(strip.crop((0, 0, min(strip.width, _TILE_W), THUMB)), (x, y))
        else:
            draw.rectangle((x, y, x + _TILE_W - 1, y + THUMB - 1), fill=(90, 90, 90))
            draw.text((x + 6, y + THUMB // 2 - 6), "no frames", fill=(200, 200, 200), font=font)
        draw.text((x, y + THUMB + 1), line1[:34], fill=(235, 235, 235), font=font)
        draw.text((x, y + THUMB + 13), line2[:34], fill=(170, 170, 170), font=font)
    sink = io.BytesIO()
    sheet.save(sink, format="PNG", optimize=True)
    return sink.getvalue()


def _thumbs(parts_by_id: dict[str, str], ids: list[str], options: StorageOptions) -> dict[str, bytes]:
    """clip id -> thumb, reading the `thumb` column of only the parts that hold `ids` (parts written before the
    column existed give none)."""
    by_part: dict[str, set[str]] = defaultdict(set)
    for cid in ids:
        by_part[parts_by_id[cid]].add(cid)
    out = {}
    for uri, wanted in by_part.items():
        table = storage.read_parquet_columns(uri, ["clip_id", "thumb"], options)  # never the frames
        if "thumb" not in table.column_names:
            continue
        for cid, thumb in zip(table["clip_id"].to_pylist(), table["thumb"].to_pylist(), strict=True):
            if cid in wanted:
                out[cid] = thumb or b""
    return out


def _where(row: dict) -> str:
    name = PurePosixPath(str(row["source"])).name
    start = row.get("start_time_s")
    if start is not None and start >= 0:
        return f"{name} @{start:.1f}s"
    frame = row.get("start_frame", -1)
    return f"{name} f{frame}" if frame is not None and frame >= 0 else name


def write_contact_sheets(output_uri: str, clips: list[dict], rejects: list[dict], parts_by_id: dict[str, str],
                         tiles: int, options: StorageOptions) -> dict[str, str]:
    """Write contact_sheets/accepted.png and contact_sheets/reject-<reason>.png under the output. `clips` and
    `rejects`: rows (clip_id, source, start_time_s / start_frame, caption / reason + detail) of this output's
    candidates; `parts_by_id`: the part each candidate is in. Returns {"accepted" | reason: relative path}."""
    if tiles <= 0:
        return {}
    groups: dict[str, list[dict]] = {}
    if clips:
        groups["accepted"] = clips
    for row in rejects:
        groups.setdefault(row["reason"], []).append(row)
    written = {}
    for name, rows in sorted(groups.items()):
        by_id = {r["clip_id"]: r for r in rows}
        picked = _sample(list(by_id), tiles)
        thumbs = _thumbs(parts_by_id, picked, options)
        cells = []
        for cid in picked:
            row = by_id[cid]
            text = row.get("caption", "") if name == "accepted" else row.get("detail", "")
            cells.append((thumbs.get(cid, b""), _where(row), str(text)))
        title = (f"{'accepted clips' if name == 'accepted' else 'rejected: ' + name} - {len(picked)} of "
                 f"{len(rows)} (a sample by clip-id hash)")
        path = f"contact_sheets/{'accepted' if name == 'accepted' else 'reject-' + name}.png"
        storage.write_bytes(storage.join(output_uri, path), render_sheet(title, cells), options)
        written[name] = path
    return written
