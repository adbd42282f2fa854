"""How should shards store a clip's frames: raw uint8 bytes, or re-encoded H.264 mp4 bytes?

For 80-frame clips at the base size (128×128) and the high-resolution copy (256×256), from
(a) the moving-shapes corpus (`lumiere.shapes.make_corpus` at 256×256, decoded back, the 128×128 copy made
    with the pipeline's own `resize_center_crop`),
(b) real photographs under a slow camera pan + zoom (Ken Burns; the sample photos shipped with scikit-learn
    and matplotlib, so no download: real natural-image detail, sub-pixel global motion),
(c) a synthetic "natural-image-like" textured clip: a 1/f-spectrum colour texture panning at sub-pixel speed, a textured
    disc moving the other way across it (occlusion) and a slowly drifting lighting gradient, and
(d) the same textured clip with per-frame sensor grain (σ = 4 grey levels), the codec's worst case,
this measures, per format (raw; mp4 at each `--crf` with the pipeline's encoder, H.264 yuv420p, x264 preset
medium; and, unless `--no-variants`, two variants at the first CRF encoded by this script: x264 preset
veryfast, since encoding is what mp4 costs the ingestion, and yuv444p, since 4:2:0 chroma subsampling alone
limits the PSNR of colourful detail):

- payload KiB/clip (the `frames` cell) and in-shard KiB/clip (a Parquet file of those cells, zstd, as
  `write_shard` writes it), and the raw/format ratio of in-shard sizes;
- encode ms/clip (raw: `ndarray.tobytes`; mp4: `lumiere.video.encode_mp4_bytes`);
- loader ms/clip = shard read (the Parquet column read back, zstd, amortised per clip) + decode (raw:
  `np.frombuffer().reshape`; mp4: `lumiere.video.decode_mp4_bytes`, with its process CPU time, all threads);
  and the loader time as a share of a training step budget per sample
  (`--budget-ms`, default 60 ms: the small STUNet at ~2 steps/s with batch 8 on 2 cores);
- reconstruction PSNR of the decoded mp4 against the raw frames (whole clip, and the worst frame); the raw
  row shows the ceiling any yuv420p encoding has (an RGB → yuv420p → RGB round trip, no compression; equal
  to what CRF 0 gives).

Timings are the best of `--repeats` runs, single process (decord and x264 use their default threading).

    .venv/bin/python benchmarks/frame_storage.py       # 3 shape, 3 photo, 1+1 texture clips
    .venv/bin/python benchmarks/frame_storage.py --shapes 2 --crf 18 --repeats 1 --json /tmp/fs.json
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lumiere.shapes import make_corpus  # noqa: E402 (after the sys.path insert)
from lumiere.video import decode_mp4_bytes, encode_mp4_bytes, read_video  # noqa: E402
from pipelines.ingest.curation import resize_center_crop  # noqa: E402

FRAMES, FPS = 80, 16


# --- sources ------------------------------------------------------------------------------------------------
def shape_clips(count: int, hr: int, seed: int) -> list[np.ndarray]:
    """`count` moving-shapes clips at hr×hr, as the pipeline sees them (written as mp4, decoded back)."""
    with tempfile.TemporaryDirectory(prefix="lumiere-fs-") as tmp:
        records = make_corpus(tmp, count, frames=FRAMES, size=hr, fps=FPS, seed=seed)
        return [read_video(Path(tmp) / r["path"])[0] for r in records]


def sample_photos() -> list[Path]:
    """Natural photographs that ship inside installed packages (found without importing them)."""
    found = []
    for pkg, rel in (("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
                     ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg")):
        spec = importlib.util.find_spec(pkg)
        for loc in (spec.submodule_search_locations or []) if spec else []:
            if (Path(loc) / rel).is_file():
                found.append(Path(loc) / rel)
    return found


def photo_clip(path: Path, hr: int) -> np.ndarray:
    """A hr×hr clip of a photo under a camera move: zoom in by 12% while panning ~1 px/frame right and
    ~0.4 px/frame down (sub-pixel, bicubic), after an antialiased resize of the photo to 1.5·hr short side."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    scale = 1.5 * hr / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    out = np.empty((FRAMES, hr, hr, 3), np.uint8)
    for t in range(FRAMES):
        u = t / (FRAMES - 1)
        s = 1.0 / (1.0 + 0.12 * u)  # input pixels per output pixel
        cx = img.width / 2 - 40 + 80 * u
        cy = img.height / 2 - 16 + 32 * u
        x0, y0 = cx - s * hr / 2, cy - s * hr / 2
        frame = img.transform((hr, hr), Image.Transform.AFFINE, (s, 0, x0, 0, s, y0), Image.Resampling.BICUBIC)
        out[t] = np.asarray(frame)
    return out


def _pink_noise(rng: np.random.Generator, n: int, alpha: float = 1.0) -> np.ndarray:
    """A periodic n×n field whose amplitude spectrum falls as 1/f^alpha (natural images: alpha ≈ 1),
    returned in the Fourier domain (so sub-pixel shifts are a phase ramp)."""
    fy, fx = np.fft.fftfreq(n)[:, None], np.fft.fftfreq(n)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    spec = np.fft.fft2(rng.standard_normal((n, n))) / f**alpha
    spec[0, 0] = 0.0
    return spec


def _shifted(spec: np.ndarray, dx: float, dy: float) -> np.ndarray:
    n = spec.shape[0]
    fy, fx = np.fft.fftfreq(n)[:, None], np.fft.fftfreq(n)[None, :]
    field = np.fft.ifft2(spec * np.exp(-2j * np.pi * (fx * dx + fy * dy))).real
    return field / field.std()


def texture_clip(hr: int, seed: int, grain: float = 0.0) -> np.ndarray:
    """A textured clip at hr×hr: colour 1/f texture panning right/down at ~0.7 px/frame, a textured disc
    (another 1/f texture) crossing it leftwards at ~1.3 px/frame, lighting gradient drifting; optional grain."""
    rng = np.random.default_rng(seed)
    n = 2 * hr  # canvas twice the frame: the crop never shows the texture's period
    # luminance + two weaker chroma fields, for background and disc
    bg = [_pink_noise(rng, n) for _ in range(3)]
    fg = [_pink_noise(rng, n, alpha=1.2) for _ in range(3)]
    mix = np.array([[1.0, 0.0, 0.0], [1.0, 0.25, 0.0], [1.0, 0.0, 0.25]])  # rgb = luma + chroma
    yy, xx = np.mgrid[0:hr, 0:hr].astype(np.float64)
    out = np.empty((FRAMES, hr, hr, 3), np.uint8)
    radius = hr * 0.22
    for t in range(FRAMES):
        s = hr / 256  # speeds scale with the frame size, so 128 and 256 show the same motion
        b = np.stack([_shifted(c, 0.7 * s * t, 0.35 * s * t)[:hr, :hr] for c in bg], -1)
        f = np.stack([_shifted(c, -1.3 * s * t, 0.2 * s * t)[:hr, :hr] for c in fg], -1)
        img_b, img_f = b @ mix.T, f @ mix.T
        cx, cy = hr * 0.8 - 1.3 * s * t, hr * 0.45 + 0.2 * s * t
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        alpha = np.clip(radius - d + 0.5, 0, 1)[..., None]  # one-pixel anti-aliased edge
        img = (1 - alpha) * (118 + 38 * img_b) + alpha * (140 + 45 * img_f)
        light = 0.85 + 0.25 * (xx / hr) * np.cos(2 * np.pi * t / FRAMES) + 0.1 * (yy / hr)
        img = img * light[..., None]
        if grain:
            img = img + rng.normal(0, grain, img.shape)
        out[t] = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return out


def encode_variant(frames: np.ndarray, fps: float, crf: int, pix_fmt: str = "yuv420p",
                   preset: str = "medium") -> bytes:
    """Like `lumiere.video.encode_mp4_bytes` (libx264, preset medium, yuv420p), with another pixel format
    (yuv444p: High 4:4:4 profile, full-resolution chroma) or x264 preset."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        stream.options = {"crf": str(int(crf)), "preset": preset}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def yuv420_round_trip(frames: np.ndarray) -> np.ndarray:
    """RGB → yuv420p → RGB with no compression: the best any yuv420p encoding can reproduce."""
    import av

    return np.stack([av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray(
        format="rgb24") for f in frames])


# --- measurement --------------------------------------------------------------------------------------------
def timed(fn, repeats: int, cpu: bool = False):
    """(result, best wall seconds) or, with cpu=True, (result, best wall s, best process CPU s) of `repeats`
    runs: the best, not the median, because the machine is shared and other load only ever adds time. The
    CPU time counts every thread of the process (decord and x264 decode/encode with several)."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    if cpu:
        return result, min(walls), min(cpus)
    return result, min(walls)


def psnr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(PSNR over the whole clip, PSNR of the worst frame) in dB."""
    err = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    per_frame = err.reshape(len(a), -1).mean(axis=1)

    def db(mse):
        return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)

    return db(err.mean()), db(per_frame.max())


def shard_size_and_read(payloads: list[bytes], repeats: int) -> tuple[float, float]:
    """Bytes per clip of a zstd Parquet file holding these `frames` cells (as write_shard writes it), and the
    time per clip to read the column back."""
    table = pa.table({"frames": pa.array(payloads, type=pa.binary())})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue()
    _, t = timed(lambda: pq.read_table(io.BytesIO(data), columns=["frames"])["frames"].to_pylist(), repeats)
    return len(data) / len(payloads), t / len(payloads)


def measure_group(name: str, clips: list[np.ndarray], size: int, crfs: list[int], repeats: int,
                  budget_ms: float, variants: bool) -> list[dict]:
    """All formats for one (source, size) group of clips."""
    h, w = clips[0].shape[1:3]
    rows = []
    formats = [("raw", None, None)] + [(f"mp4 crf{c}", c, encode_mp4_bytes) for c in crfs]
    if variants:
        formats.append((f"mp4 crf{crfs[0]} veryfast", crfs[0],
                        lambda c, f, q: encode_variant(c, f, q, preset="veryfast")))
        formats.append((f"mp4 crf{crfs[0]} yuv444p", crfs[0], lambda c, f, q: encode_variant(c, f, q, "yuv444p")))
    raw_shard = None
    for fmt, crf, encoder in formats:
        enc_t, dec_t, dec_cpu, payloads, psnrs, worst = [], [], [], [], [], []
        for clip in clips:
            if crf is None:
                data, te = timed(clip.tobytes, repeats)
                out, td, tc = timed(lambda d=data: np.frombuffer(d, np.uint8).reshape(FRAMES, h, w, 3), repeats,
                                    cpu=True)
                p, pw = psnr(yuv420_round_trip(clip), clip)
                psnrs.append(p)
                worst.append(pw)
            else:
                data, te = timed(lambda c=clip, q=crf, e=encoder: e(c, FPS, q), repeats)
                out, td, tc = timed(lambda d=data: decode_mp4_bytes(d), repeats, cpu=True)
                assert out.shape == clip.shape, (out.shape, clip.shape)
                p, pw = psnr(out, clip)
                psnrs.append(p)
                worst.append(pw)
            payloads.append(data)
            enc_t.append(te)
            dec_t.append(td)
            dec_cpu.append(tc)
        shard_bytes, read_t = shard_size_and_read(payloads, repeats)
        if crf is None:
            raw_shard = shard_bytes
        dec_ms = 1e3 * (statistics.mean(dec_t) + read_t)  # the read is single-threaded: wall ≈ CPU
        rows.append({
            "source": name, "size": size, "format": fmt, "clips": len(clips),
            "payload_kib": statistics.mean(len(p) for p in payloads) / 1024,
            "shard_kib": shard_bytes / 1024,
            "raw_over_format": raw_shard / shard_bytes,
            "encode_ms": 1e3 * statistics.mean(enc_t),
            "read_ms": 1e3 * read_t,
            "decode_only_ms": 1e3 * statistics.mean(dec_t),
            "decode_only_cpu_ms": 1e3 * statistics.mean(dec_cpu),
            "decode_ms": dec_ms,
            "decode_budget_pct": 100 * dec_ms / budget_ms,
            "psnr_db": statistics.mean(psnrs) if psnrs else None,
            "psnr_worst_frame_db": min(worst) if worst else None,
        })
    return rows


def table(rows: list[dict], budget_ms: float) -> str:
    head = ("| source | size | format | payload KiB/clip | in-shard KiB/clip | raw / this (in-shard) "
            "| encode ms/clip | shard read ms/clip | decode ms/clip (CPU ms) | loader ms/clip "
            f"| loader / {budget_ms:g} ms budget | PSNR dB (worst frame) |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        q = f"{r['psnr_db']:.1f} ({r['psnr_worst_frame_db']:.1f})"
        if r["format"] == "raw":
            q = f"lossless; yuv420p ceiling {q}"
        lines.append(
            f"| {r['source']} | {r['size']} | {r['format']} | {r['payload_kib']:.0f} | {r['shard_kib']:.0f} "
            f"| {r['raw_over_format']:.1f}× | {r['encode_ms']:.1f} | {r['read_ms']:.2f} "
            f"| {r['decode_only_ms']:.2f} ({r['decode_only_cpu_ms']:.1f}) | {r['decode_ms']:.2f} "
            f"| {r['decode_budget_pct']:.1f}% | {q} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=int, default=3, help="moving-shapes clips (default 3)")
    ap.add_argument("--photos", type=int, default=3, help="photo-pan clips, up to 3 (default 3)")
    ap.add_argument("--textures", type=int, default=1,
                    help="textured clips, each with and without grain (default 1)")
    ap.add_argument("--crf", type=int, nargs="+", default=[18, 23], help="mp4 CRFs to compare (default 18 23)")
    ap.add_argument("--no-variants", action="store_true", help="skip the x264 veryfast and yuv444p variants")
    ap.add_argument("--size", type=int, default=128, help="base size (default 128)")
    ap.add_argument("--hr-size", type=int, default=256, help="high-resolution size (default 256)")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats, best of (default 5)")
    ap.add_argument("--budget-ms", type=float, default=60.0, help="training time per sample (default 60 ms)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    sources = {"shapes": shape_clips(args.shapes, args.hr_size, args.seed)}
    if args.photos:
        sources["photo pan"] = [photo_clip(p, args.hr_size) for p in sample_photos()[:args.photos]]
    if args.textures:
        sources["texture"] = [texture_clip(args.hr_size, args.seed + i) for i in range(args.textures)]
        sources["texture+grain"] = [texture_clip(args.hr_size, args.seed + i, grain=4.0)
                                    for i in range(args.textures)]
    print(f"sources generated in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    rows = []
    for name, hr_clips in sources.items():
        base_clips = [resize_center_crop(c, args.size) for c in hr_clips]  # as decode_and_cut makes them
        for size, clips in ((args.size, base_clips), (args.hr_size, hr_clips)):
            rows += measure_group(name, clips, size, args.crf, args.repeats, args.budget_ms, not args.no_variants)
            print(f"{name} {size}: done at {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    print(f"{FRAMES}-frame clips; decode = shard column read (zstd Parquet, per clip) + frombuffer/decode_mp4_bytes;"
          f" best of {args.repeats}; 1-min load average {load0:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    print(table(rows, args.budget_ms))
    if args.json:
        meta = {"argv": sys.argv[1:], "python": platform.python_version(), "machine": platform.machine(),
                "budget_ms": args.budget_ms, "loadavg_start": load0, "loadavg_end": os.getloadavg()[0]}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
