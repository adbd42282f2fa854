"""End-to-end ingestion throughput (`pipelines.ingest.job.run_ingest`) against the decode limit, and where the
time goes.

1. Corpus: `--videos` videos, `--seconds` long, written with `lumiere.video.write_mp4` (CRF 12) at frame
   rates cycling through `--fps-list` (so the pipeline resamples to 16 fps), plus captions.jsonl, in a temp dir:
   `--source shapes`: moving shapes at `--side`×`--side`; `--source photo`: a camera pan + zoom over the sample
   photographs of frame_storage.py at `--width`×`--height` (natural-image detail, so decoding and re-encoding
   cost what they cost on real footage; sources of 256 px or more also get the 256×256 hr copy).
2. Raw decode: a plain decord loop over the same files (`VideoReader` + `get_batch` of every frame), in one
   process with decord's default threading and with `num_threads=1`, and in N processes at once (N = the
   machine's cores) with `num_threads=1` each: the fastest of these is the decode limit on those cores.
3. Stages in-process, no Ray: the curation functions called in `decode_and_cut`'s order, each timed
   (probe, decode_with_timeout = in-process decode with a deadline, multi_thumbnails, shot_boundaries,
   clip_scores, resize_center_crop base/hr, mp4 encode base/hr, decoder and encoders with `codec_threads`),
   with comparisons in parentheses (the decode and the encodes at the libraries' default threading), then
   `decode_and_cut` itself per file, `CaptionEmbedder` (construction and calls) and `write_shard`. torch runs
   with 1 thread here, as in a Ray task with num_cpus=1.
4. End to end: `run_ingest` on a local Ray started with `ray.init(address="local", num_cpus=N)` for each N in
   `--ray-cpus`, with decode_num_cpus=1 (the embedding actor holds 0.5 CPU, a writer needs 0.5, so at most
   N−1 decode tasks fit; how many really ran at once is measured). Ray start-up is timed separately; the
   pipeline time is from just before `run_ingest` to just after it returns (listing, Ray Data, embedding actor
   start-up, shards, finalize). A cold run on a fresh Ray (worker processes start and import torch etc. during
   the run) is followed by a warm run into a new output on the same Ray (unless `--no-warm`).
   Each stage function is wrapped (in this script only) to log its start/end times and process id, which
   gives the real decode concurrency and a timeline; the CPU seconds of every process on the machine during
   the run (Linux /proc) are grouped by role (task workers, embedding actor, driver, Ray's processes). A
   watchdog stops a run after `--timeout` s.

    .venv/bin/python benchmarks/ingest_throughput.py                 # 24 shapes videos, Ray num_cpus 2 and 4
    .venv/bin/python benchmarks/ingest_throughput.py --source photo --videos 12 --ray-cpus 4
    .venv/bin/python benchmarks/ingest_throughput.py --videos 8 --ray-cpus 4 --json /tmp/ingest.json

5. Side by side (`--against DIR`, DIR holding another version's `pipelines/` package, e.g. the commit before a
   change: `git archive REV pipelines | tar -x -C DIR`): on the same corpus, `decode_and_cut` over all files
   in one process and `run_ingest` end to end (fresh Ray, cold + warm) for the other version and this one,
   alternating A B B A (`--rounds`), each in a fresh Python process (so both pay the same imports and Ray
   start), next to the raw decode; ratios come from the same run.

    .venv/bin/python benchmarks/ingest_throughput.py --source photo --videos 12 --against /tmp/base --ray-cpus 4
"""

from __future__ import annotations

import _thread
import argparse
import inspect
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if os.environ.get("INGEST_BENCH_TREE"):  # --against: import `pipelines` from another version's tree
    sys.path.insert(0, os.environ["INGEST_BENCH_TREE"])

from lumiere.shapes import COLORS, DIRECTIONS, SHAPES, ShapeSpec, caption, render_clip  # noqa: E402
from lumiere.storage import StorageOptions  # noqa: E402
from lumiere.video import write_mp4  # noqa: E402
from pipelines.ingest import curation, stage1_list, stage2_decode, stage3_embed, stage4_write  # noqa: E402
from pipelines.ingest import job as ingest  # noqa: E402
from pipelines.ingest.config import IngestConfig, load_ingest_config  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from frame_storage import sample_photos  # noqa: E402


# --- 1. corpus ----------------------------------------------------------------------------------------------
def photo_frames(path: Path, n: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """n frames of a height×width window panning (~1 px/frame, random direction) and zooming over a photo."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    scale = 1.25 * max(height / img.height, width / img.width)  # room to pan and zoom
    if scale != 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    vx, vy = rng.uniform(-1, 1, size=2)
    zoom = rng.uniform(-0.1, 0.1)
    out = np.empty((n, height, width, 3), np.uint8)
    for t in range(n):
        u = t / max(n - 1, 1)
        s = 1.0 / (1.0 + zoom * u)
        cx = img.width / 2 + vx * (t - n / 2)
        cy = img.height / 2 + vy * (t - n / 2)
        data = (s, 0, cx - s * width / 2, 0, s, cy - s * height / 2)
        out[t] = np.asarray(img.transform((width, height), Image.Transform.AFFINE, data, Image.Resampling.BICUBIC))
    return out


def make_videos(root: Path, args) -> list[dict]:
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    photos = sample_photos() if args.source == "photo" else []
    records = []
    for i in range(args.videos):
        fps = args.fps_list[i % len(args.fps_list)]
        n = round(fps * args.seconds)
        if args.source == "photo":
            frames = photo_frames(photos[i % len(photos)], n, args.height, args.width, rng)
            text = f"a camera moving over {photos[i % len(photos)].stem.replace('_', ' ')}"
        else:
            spec = ShapeSpec(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))),
                             str(rng.choice(list(DIRECTIONS))))
            frames = render_clip([spec], n, args.side, np.random.default_rng([args.seed, i]))
            text = caption(spec)
        rel = f"videos/v{i:03d}_{fps:g}fps.mp4"
        write_mp4(root / rel, frames, fps=fps)
        records.append({"path": rel, "caption": text, "fps": fps, "frames": len(frames),
                        "size": f"{frames.shape[2]}x{frames.shape[1]}"})
    with open(root / "captions.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"path": r["path"], "caption": r["caption"]}) + "\n")
    return records


def repeat_corpus(root: Path, records: list[dict], times: int, dest: Path) -> tuple[Path, list[dict]]:
    """The corpus listed `times` times under new names (hard links, or copies across file systems): a larger
    corpus at no generation cost, so fixed start-up costs stop dominating. Every name is a separate source
    to the pipeline (its own file id and clips); decoding cost per file is unchanged."""
    import shutil

    (dest / "videos").mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(times):
        for r in records:
            rel = r["path"].replace(".mp4", f"-r{k}.mp4")
            try:
                os.link(root / r["path"], dest / rel)
            except OSError:
                shutil.copyfile(root / r["path"], dest / rel)
            out.append({**r, "path": rel})
    with open(dest / "captions.jsonl", "w") as f:
        for r in out:
            f.write(json.dumps({"path": r["path"], "caption": r["caption"]}) + "\n")
    return dest, out


# --- 2. raw decode ------------------------------------------------------------------------------------------
def raw_decode(paths: list[str], num_threads: int) -> dict:
    import decord

    frames = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for p in paths:
        vr = decord.VideoReader(p, ctx=decord.cpu(0), num_threads=num_threads)
        frames += len(vr.get_batch(list(range(len(vr)))).asnumpy())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"frames": frames, "seconds": wall, "cpu_seconds": cpu, "frames_per_s": frames / wall}


def raw_decode_parallel(paths: list[str], procs: int) -> dict:
    """The decode limit on `procs` cores: `procs` processes at once, each a one-thread decord loop over every
    procs-th file (one thread per process is the cheapest decode per CPU second on these files; see RESULTS.md).
    Workers are started and have imported decord before the clock starts."""
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(raw_decode, [paths[:1]] * procs, [1] * procs))  # start the workers, not timed
        t0 = time.perf_counter()
        parts = list(pool.map(raw_decode, [paths[i::procs] for i in range(procs)], [1] * procs))
        wall = time.perf_counter() - t0
    frames = sum(p["frames"] for p in parts)
    return {"frames": frames, "seconds": wall, "cpu_seconds": sum(p["cpu_seconds"] for p in parts),
            "frames_per_s": frames / wall, "processes": procs}


# --- 3. stages in-process -----------------------------------------------------------------------------------
def _cpu() -> float:
    """CPU seconds of this process (all threads) and its finished children (the forked decoders)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Timer:
    """Wall and CPU seconds per named step (CPU time is less disturbed by other load on a shared machine)."""

    def __init__(self):
        self.total = defaultdict(float)
        self.cpu = defaultdict(float)
        self.calls = defaultdict(int)

    def __call__(self, name, fn, *a, **kw):
        c0, t0 = _cpu(), time.perf_counter()
        out = fn(*a, **kw)
        self.total[name] += time.perf_counter() - t0
        self.cpu[name] += _cpu() - c0
        self.calls[name] += 1
        return out


def stage_breakdown(files: list[dict], cfg: IngestConfig, out_dir: str) -> dict:
    """Per-file work in decode_and_cut's order (same functions, same arguments), then the real stages.
    Names in parentheses are comparisons, not part of decode_and_cut."""
    import torch

    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    for row in files[:2]:  # warm-up (first calls into torch, decord, x264), not timed
        list(stage2_decode.decode_and_cut(row, cfg, StorageOptions()))
    T = Timer()
    clips = 0
    for row in files:
        path = row["source"]
        meta = T("probe", curation.probe, path)
        short_side = max(cfg.size, cfg.hr_size or 0)
        src_size = (meta.width, meta.height)
        frames, _, _ = T("decode_with_timeout", curation.decode_with_timeout, path, cfg.fps, short_side,
                         cfg.decode_timeout_s, cfg.codec_threads, src_size)
        if cfg.codec_threads != 0:
            T("(decode_with_timeout, decord's default threads)", curation.decode_with_timeout, path, cfg.fps,
              short_side, cfg.decode_timeout_s, 0, src_size)
        thumbs = T("multi_thumbnails", curation.multi_thumbnails, frames, (32, 64))
        shots = T("shot_boundaries", curation.shot_boundaries, frames, cfg.cut_threshold, thumbs[32])
        if cfg.shot_detector == "transnetv2":  # what decode_and_cut runs instead of the histogram then
            T("TransNetV2Cuts (push + finish)", _transnet_labels, frames)
        for a, b in shots:
            for k in range((b - a) // cfg.clip_frames):
                start = a + k * cfg.clip_frames
                clip = frames[start: start + cfg.clip_frames]
                T("clip_scores", curation.clip_scores, clip, thumbs=thumbs[64][start:start + cfg.clip_frames])
                copies = [("base", cfg.size)]
                if cfg.hr_size and min(meta.width, meta.height) >= cfg.hr_size:
                    copies.append(("hr", cfg.hr_size))
                for name, size in copies:
                    resized = T(f"resize_center_crop {name}", curation.resize_center_crop, clip, size)
                    kind = ("mp4 " + cfg.mp4_preset + (" + fast analysis" if cfg.mp4_fast_analysis else "")
                            if cfg.frame_format == "mp4" else "raw")
                    T(f"encode {name} ({kind})", stage2_decode._encode, resized, cfg)
                    if cfg.frame_format == "mp4" and cfg.codec_threads != 0:
                        T(f"(encode {name}, x264's default threads)", stage2_decode._encode, resized,
                          cfg.model_copy(update={"codec_threads": 0}))
                clips += 1
    per_file = {"sum_of_parts_s": sum(v for k, v in T.total.items() if not k.startswith("(")),
                "sum_of_parts_cpu_s": sum(v for k, v in T.cpu.items() if not k.startswith("("))}

    options = StorageOptions()
    rows = []
    for row in files:  # the real thing

        rows += T("decode_and_cut (whole)", _candidates_list, row, cfg, options)
    per_file["decode_and_cut_s"] = T.total["decode_and_cut (whole)"]
    per_file["decode_and_cut_cpu_s"] = T.cpu["decode_and_cut (whole)"]
    ok = sum(r["status"] == "ok" for r in rows)

    embedder = T("CaptionEmbedder() construction", stage3_embed.CaptionEmbedder, cfg)
    batches = []
    for i in range(0, len(rows), cfg.embed_batch_size):
        chunk = rows[i:i + cfg.embed_batch_size]
        batch = {k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]}
        batches.append(T("CaptionEmbedder() call", embedder, batch))
    for b in batches:
        T("write_shard", stage4_write.write_shard, b, out_dir, options)
    torch.set_num_threads(os.cpu_count() or 1)
    return {"clips": clips, "ok_rows": ok, "rows": len(rows), "seconds": dict(T.total), "cpu_seconds": dict(T.cpu),
            "calls": dict(T.calls), **per_file}


# --- 4. end to end on Ray -----------------------------------------------------------------------------------
def _transnet_labels(frames: np.ndarray) -> np.ndarray:
    from pipelines.ingest.shots import TransNetV2Cuts

    detector = TransNetV2Cuts()
    labels = [detector.push(frames[i:i + 64]) for i in range(0, len(frames), 64)]
    return np.concatenate([*labels, detector.finish()])


def _candidates_list(row, cfg, options) -> list[dict]:
    # decode_and_cut yields its candidates as it makes them: consume them all, so the timing covers the work
    return list(stage2_decode.decode_and_cut(row, cfg, options))


def _traced(kind: str, fn, log_dir: str):
    """fn wrapped to append (kind, pid, start, end) to a per-process file in log_dir (runs inside Ray workers);
    a generator function's output is consumed inside the timing (decode_and_cut yields its candidates)."""
    def wrapper(*a, **kw):
        t0 = time.time()
        try:
            out = fn(*a, **kw)
            return list(out) if inspect.isgenerator(out) else out
        finally:
            with open(os.path.join(log_dir, f"{os.getpid()}.log"), "a") as f:
                f.write(f"{kind} {os.getpid()} {t0} {time.time()}\n")
    return wrapper


def _traced_embedder(log_dir: str):
    base = stage3_embed.CaptionEmbedder

    class TracedEmbedder(base):
        def __init__(self, cfg):
            _traced("embed_init", super().__init__, log_dir)(cfg)

        def __call__(self, batch):
            return _traced("embed", super().__call__, log_dir)(batch)

    return TracedEmbedder


def _read_trace(log_dir: str) -> list[tuple[str, int, float, float]]:
    events = []
    for name in os.listdir(log_dir):
        with open(os.path.join(log_dir, name)) as f:
            for line in f:
                kind, pid, a, b = line.split()
                events.append((kind, int(pid), float(a), float(b)))
    return events


def _max_concurrency(spans: list[tuple[float, float]]) -> int:
    points = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    best = cur = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


def _process_cpu() -> dict[tuple[int, str], float]:
    """CPU seconds (user + system) of every process on the machine, by (pid, name) (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        out[(int(stat.parent.name), name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _machine_cpu() -> tuple[float, float]:
    """(all, idle) CPU seconds of the machine since boot (/proc/stat)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(v) / os.sysconf("SC_CLK_TCK"), (v[3] + v[4]) / os.sysconf("SC_CLK_TCK")


def _cpu_by_role(before: dict, after: dict, driver_pid: int) -> dict[str, float]:
    """CPU seconds spent during a run, grouped: the driver, decode/write task workers, the embedding actor,
    Ray's own processes and everything else."""
    roles = defaultdict(float)
    for (pid, name), cpu in after.items():
        d = cpu - before.get((pid, name), 0.0)
        if d <= 0:
            continue
        if pid == driver_pid:
            role = "driver (Ray Data executor, listing, finalize, encoder record)"
        elif name.startswith("ray::MapWorker"):
            role = "embedding actor"
        elif name.startswith("ray::"):
            # idle task workers show as ray::IDLE between tasks; decode and write tasks run in them
            role = "task workers (decode, write)" if not name.startswith(("ray::_", "ray::Dashboard")) \
                else "Ray's actors (stats, autoscaler, dashboard agent)"
        elif name in ("raylet", "gcs_server") or name.startswith(("python", "dashboard", "log_monitor")):
            role = "Ray system (raylet, GCS, monitors)"
        else:
            role = "other processes"
        roles[role] += d
    return dict(roles)


def _ray_worker_rss() -> dict[int, int]:
    """Resident bytes of every Ray worker process (ray::…: task workers and actors), by pid (Linux /proc)."""
    page = os.sysconf("SC_PAGE_SIZE")
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            if not text[text.index("(") + 1:text.rindex(")")].startswith("ray::"):
                continue
            out[int(stat.parent.name)] = int((stat.parent / "statm").read_text().split()[1]) * page
        except (OSError, ValueError):  # the process ended meanwhile
            continue
    return out


class RssSampler:
    """Samples the Ray workers' resident memory every `every` s during a run: the peak of any one worker (a
    decode task's process, the embedding actor) and the peak of their sum."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak_one, self.peak_sum = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every):
            rss = _ray_worker_rss()
            if rss:
                self.peak_one = max(self.peak_one, max(rss.values()))
                self.peak_sum = max(self.peak_sum, sum(rss.values()))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _one_run(root: Path, cfg: IngestConfig, out: Path, timeout: float, log_dir: str) -> dict:
    """One traced run_ingest on the already started Ray; stopped by a watchdog after `timeout` s."""
    saved = ingest.decode_and_cut, ingest.CaptionEmbedder, ingest.write_shard
    ingest.decode_and_cut = _traced("decode", stage2_decode.decode_and_cut, log_dir)
    ingest.CaptionEmbedder = _traced_embedder(log_dir)
    ingest.write_shard = _traced("write", stage4_write.write_shard, log_dir)
    done = threading.Event()

    def watchdog():
        if not done.wait(timeout):
            _thread.interrupt_main()

    threading.Thread(target=watchdog, daemon=True).start()
    result = {"loadavg_before": os.getloadavg()[0]}
    lines = []
    procs_before, machine_before = _process_cpu(), _machine_cpu()
    start = time.time()
    t0 = time.perf_counter()
    sampler = RssSampler()
    try:
        with sampler:
            report = ingest.run_ingest(str(root), str(out), str(root / "captions.jsonl"), cfg,
                                       log=lambda m: lines.append((time.time() - start, m)))
        result.update(seconds=time.perf_counter() - t0, clips=report["clips"], rejects=report["rejects"],
                      status="ok")
    except KeyboardInterrupt:
        result.update(seconds=time.perf_counter() - t0, status=f"stopped by the watchdog after {timeout:g}s")
    finally:
        done.set()
        ingest.decode_and_cut, ingest.CaptionEmbedder, ingest.write_shard = saved
    result["loadavg_after"] = os.getloadavg()[0]
    result["peak_worker_rss_mib"] = round(sampler.peak_one / 2**20, 1)
    result["peak_workers_rss_sum_mib"] = round(sampler.peak_sum / 2**20, 1)
    (all1, idle1), (all0, idle0) = _machine_cpu(), machine_before
    result["machine_busy_cpu_s"] = (all1 - all0) - (idle1 - idle0)
    result["cpu_by_role"] = _cpu_by_role(procs_before, _process_cpu(), os.getpid())
    result["log"] = [(round(t, 2), m) for t, m in lines]
    by = defaultdict(list)
    for kind, pid, a, b in _read_trace(log_dir):
        by[kind].append((pid, a - start, b - start))
    dec = by["decode"]
    if dec:
        result["decode_tasks"] = len(dec)
        result["decode_processes"] = len({p for p, _, _ in dec})
        result["decode_max_concurrent"] = _max_concurrency([(a, b) for _, a, b in dec])
        result["decode_task_s_median"] = statistics.median(b - a for _, a, b in dec)
        result["decode_task_s_sum"] = sum(b - a for _, a, b in dec)
        result["first_decode_start_s"] = min(a for _, a, _ in dec)
        result["last_decode_end_s"] = max(b for _, _, b in dec)
    for kind in ("embed_init", "embed", "write"):
        if by[kind]:
            result[f"{kind}_start_s"] = min(a for _, a, _ in by[kind])
            result[f"{kind}_end_s"] = max(b for _, _, b in by[kind])
            result[f"{kind}_s_sum"] = sum(b - a for _, a, b in by[kind])
            result[f"{kind}_calls"] = len(by[kind])
    return result


def end_to_end(root: Path, cfg: IngestConfig, num_cpus: int, timeout: float, work: Path, warm: bool) -> list[dict]:
    """A cold run (fresh Ray: worker processes start and import during the run) and, with `warm`, a second
    run into a new output on the same Ray (task workers already up; the embedding actor starts again)."""
    import ray

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    results = []
    try:
        for run in ("cold", "warm") if warm else ("cold",):
            log_dir = tempfile.mkdtemp(prefix="trace-", dir=work)
            r = _one_run(root, cfg, work / f"out-{num_cpus}cpu-{run}", timeout, log_dir)
            results.append({"ray_cpus": num_cpus, "run": run, "ray_start_s": ray_start, **r})
            if r["status"] != "ok":
                break
    finally:
        t1 = time.perf_counter()
        ray.shutdown()
        for r in results:
            r["ray_shutdown_s"] = time.perf_counter() - t1
    return results


# --- 5. side by side with another version ------------------------------------------------------------------
def _phase(args, cfg: IngestConfig) -> dict:
    """In a child process (`--phase`), with `pipelines` from INGEST_BENCH_TREE or this tree: one measurement."""
    root = args.corpus
    files, _ = stage1_list.list_inputs(str(root), str(root / "captions.jsonl"), cfg, StorageOptions())
    if args.phase == "raw":
        paths = [f["source"] for f in files]
        raw_decode(paths[:2], 0)  # warm-up, not timed
        one, limit = raw_decode(paths, 1), raw_decode_parallel(paths, os.cpu_count() or 1)
        return {**raw_decode(paths, 0), "one_thread_seconds": one["seconds"], "all_cores_seconds": limit["seconds"],
                "all_cores_processes": limit["processes"]}
    if args.phase == "dac":
        import torch

        torch.set_num_threads(1)
        for row in files[:2]:  # warm-up, not timed
            list(stage2_decode.decode_and_cut(row, cfg, StorageOptions()))
        c0, t0 = _cpu(), time.perf_counter()
        rows = [r for row in files for r in stage2_decode.decode_and_cut(row, cfg, StorageOptions())]
        return {"seconds": time.perf_counter() - t0, "cpu_seconds": _cpu() - c0,
                "clips": sum(r["status"] == "ok" for r in rows)}
    work = Path(tempfile.mkdtemp(prefix="e2e-", dir=os.getcwd()))  # the side-by-side run's temp dir
    return {"runs": end_to_end(root, cfg, args.ray_cpus[0], args.timeout, work, True)}


def side_by_side(args, root: Path, work: Path) -> list[dict]:
    """decode_and_cut in one process, then run_ingest (cold, warm) per Ray CPU count, for the version in
    args.against and this one, alternating A B (B A …) per measurement; each in a fresh process."""
    order = [("before", str(args.against)), ("after", "")]
    rounds = [order if i % 2 == 0 else order[::-1] for i in range(args.rounds)]
    phases = [("dac", None)] + [("e2e", n) for n in args.ray_cpus]
    out = []
    for phase, n in phases:
        for rnd in rounds:
            # the raw decode once per round too (in this version's process), so every ratio to it is side by side
            for label, tree in ([("raw", "")] if phase == "dac" else []) + rnd:
                # PYTHONPATH too: Ray's worker processes must import the same `pipelines` as the driver
                path = os.pathsep.join(p for p in (tree, str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
                env = {**os.environ, "INGEST_BENCH_TREE": tree, "PYTHONPATH": path}
                res = work / f"side-{phase}-{n}-{label}-{len(out)}.json"
                cmd = [sys.executable, __file__, "--corpus", str(root), "--phase", "raw" if label == "raw" else phase,
                       "--json", str(res),
                       "--timeout", str(args.timeout), *sum((["--set", o] for o in args.overrides), [])]
                if n:
                    cmd += ["--ray-cpus", str(n)]
                t0 = time.perf_counter()
                # cwd outside the repository: Ray puts the driver's cwd on its workers' sys.path before PYTHONPATH
                proc = __import__("subprocess").run(cmd, env=env, cwd=work, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"side-by-side {phase} {label} failed")
                data = json.loads(res.read_text())
                print(f"side by side: {phase} {n or ''} {label}: {time.perf_counter() - t0:.1f}s "
                      f"(process)", file=sys.stderr, flush=True)
                out.append({"phase": phase, "ray_cpus": n, "version": label, **data})
    return out


def report_side_by_side(rows: list[dict], src_frames: int, cores: int) -> None:
    def mean(xs):
        return statistics.mean(xs) if xs else float("nan")

    raw = [r for r in rows if r["version"] == "raw"]
    raw_s, raw_cpu = mean([r["seconds"] for r in raw]), mean([r["cpu_seconds"] for r in raw])
    # the fastest raw decode on the cores a row uses: one process (decode_and_cut) or all of them (run_ingest)
    limit_one = min(raw_s, mean([r.get("one_thread_seconds", raw_s) for r in raw]))
    limit_all = min(limit_one, mean([r.get("all_cores_seconds", raw_s) for r in raw]))
    print(f"\nSide by side, same corpus, each measurement in a fresh process, rounds alternating before/after "
          f"(A B, B A, …; mean of {len(raw)} rounds). Raw decord decode in the same rounds: default threads "
          f"{raw_s:.2f} s wall, {raw_cpu:.2f} s CPU ({', '.join(format(r['seconds'], '.2f') for r in raw)} s); "
          f"fastest in one process {limit_one:.2f} s; fastest on all cores {limit_all:.2f} s.\n")
    print("| what | before s | after s | before / after | before / raw | after / raw | after / fastest raw "
          "on the same cores | after: clips/s | after: source frames/s per core | seconds per round "
          "(before; after) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    keys = [("dac", None, None)] + sorted({("e2e", r["ray_cpus"], run["run"]) for r in rows if r["phase"] == "e2e"
                                          for run in r["runs"]}, key=lambda k: (k[1], k[2] != "cold"))
    for phase, n, run in keys:
        vals, each, cpu = {}, {}, {}
        clips = 0
        for v in ("before", "after"):
            if phase == "dac":
                sel = [r for r in rows if r["phase"] == "dac" and r["version"] == v]
                clips = sel[0]["clips"]
                cpu[v] = mean([r["cpu_seconds"] for r in sel])
                sel = [r["seconds"] for r in sel]
            else:
                runs = [x for r in rows if r["phase"] == "e2e" and r["ray_cpus"] == n and r["version"] == v
                        for x in r["runs"] if x["run"] == run and x["status"] == "ok"]
                sel = [x["seconds"] for x in runs]
                clips = runs[0]["clips"] if runs else 0
            vals[v], each[v] = mean(sel), ", ".join(f"{x:.1f}" for x in sel)
        b, a = vals["before"], vals["after"]
        what = ("decode_and_cut in-process, one process, torch 1 thread" if phase == "dac"
                else f"run_ingest, Ray num_cpus={n}, {run}")
        per_core = src_frames / a if phase == "dac" else src_frames / a / cores
        limit = limit_one if phase == "dac" else limit_all
        print(f"| {what} | {b:.2f} | {a:.2f} | {b / a:.2f}× | {b / raw_s:.2f}× | {a / raw_s:.2f}× "
              f"| {a / limit:.2f}× | {clips / a:.2f} | {per_core:.0f} | {each['before']}; {each['after']} |")
        if phase == "dac":
            print(f"| decode_and_cut, CPU seconds (vs raw decode CPU) | {cpu['before']:.2f} | {cpu['after']:.2f} "
                  f"| {cpu['before'] / cpu['after']:.2f}× | {cpu['before'] / raw_cpu:.2f}× "
                  f"| {cpu['after'] / raw_cpu:.2f}× | | | | |")


# --- report ---------------------------------------------------------------------------------------------------
def report(data: dict) -> None:
    """Print the markdown tables of one run (also used by --from-json)."""
    m, stages, e2e = data["meta"], data["stages"], data["end_to_end"]
    raw_default, raw_one = data["raw_decode"]["default"], data["raw_decode"]["one_thread"]
    raw_all = data["raw_decode"].get("all_cores")  # absent in runs saved before it existed
    cfg, cores, src_frames = m["config"], m["cores"], m["source_frames"]
    base = raw_default["seconds"]
    # the decode limit on the cores a row uses: one process (in-process rows) or the whole machine (Ray rows)
    limit_one = min(raw_default["seconds"], raw_one["seconds"])
    limit_all = min(limit_one, raw_all["seconds"]) if raw_all else limit_one
    repeat = f" ({m['videos'] // m['repeat']} distinct, each listed {m['repeat']}×)" if m.get("repeat", 1) > 1 else ""
    print(f"Corpus: {m['videos']} {m['source']} videos{repeat}, {m['size']}, {m['seconds']:g} s each at fps "
          f"{', '.join(f'{f:g}' for f in m['fps_list'])} → {src_frames} source frames; config: "
          f"{', '.join(['encoder_from=small', *m['overrides']])} (frame_format {cfg['frame_format']}, "
          f"crf {cfg['mp4_crf']}, preset {cfg.get('mp4_preset', 'medium')}, codec_threads "
          f"{cfg.get('codec_threads', 0)}, hr_size {cfg['hr_size']}); {cores} cores; 1-min load average "
          f"{m['loadavg_start']:.1f} at the start, {m['loadavg_end']:.1f} at the end\n")
    print("| what | seconds | clips/s | source frames/s | source frames per core-second | time / raw decode "
          "(default threads) | time / fastest raw decode on the same cores |")
    print("|---|---|---|---|---|---|---|")
    raws = [("raw decord decode, default threads", raw_default, limit_one),
            ("raw decord decode, num_threads=1", raw_one, limit_one)]
    if raw_all:
        raws.append((f"raw decord decode, {raw_all['processes']} processes × num_threads=1", raw_all, limit_all))
    for name, r, limit in raws:
        print(f"| {name} (CPU {r['cpu_seconds']:.2f}s) | {r['seconds']:.2f} | – | {r['frames_per_s']:.0f} "
              f"| {r['frames'] / r['cpu_seconds']:.0f} (per CPU s) | {r['seconds'] / base:.2f}× "
              f"| {r['seconds'] / limit:.2f}× |")
    if stages:
        s, c = stages["decode_and_cut_s"], stages["decode_and_cut_cpu_s"]
        print(f"| decode_and_cut in-process, one process, torch 1 thread (CPU {c:.2f}s) | {s:.2f} "
              f"| {stages['clips'] / s:.2f} | {src_frames / s:.0f} | {src_frames / c:.0f} (per CPU s) "
              f"| {s / base:.2f}× | {s / limit_one:.2f}× |")
    for r in e2e:
        what = f"run_ingest, Ray num_cpus={r['ray_cpus']}, {r['run']}"
        if r["status"] != "ok":
            print(f"| {what} | {r['status']} | | | | | |")
            continue
        s = r["seconds"]
        rss = (f"; peak RSS: one worker {r['peak_worker_rss_mib']:.0f} MiB, all workers "
               f"{r['peak_workers_rss_sum_mib']:.0f} MiB" if "peak_worker_rss_mib" in r else "")
        print(f"| {what} (≤{r.get('decode_max_concurrent', '?')} decode tasks at once{rss}) | {s:.2f} "
              f"| {r['clips'] / s:.2f} | {src_frames / s:.0f} | {src_frames / s / cores:.0f} (whole machine) "
              f"| {s / base:.2f}× | {s / limit_all:.2f}× |")

    if data.get("side_by_side"):
        report_side_by_side(data["side_by_side"], src_frames, cores)
    if stages:
        print("\nIn-process breakdown (same functions and order as decode_and_cut; torch 1 thread):\n")
        print("| step | calls | wall s | wall ms/call | CPU ms/call | CPU share of decode_and_cut |")
        print("|---|---|---|---|---|---|")
        for k, v in sorted(stages["cpu_seconds"].items(), key=lambda kv: -kv[1]):
            n, wall = stages["calls"][k], stages["seconds"][k]
            share = "" if k.startswith(("decode_and_cut", "CaptionEmbedder", "write_shard", "(")) \
                else f"{100 * v / stages['decode_and_cut_cpu_s']:.0f}%"
            print(f"| {k} | {n} | {wall:.2f} | {1e3 * wall / n:.1f} | {1e3 * v / n:.1f} | {share} |")
        print(f"\nsum of the timed parts: wall {stages['sum_of_parts_s']:.2f}s, "
              f"CPU {stages['sum_of_parts_cpu_s']:.2f}s; "
              f"decode_and_cut: wall {stages['decode_and_cut_s']:.2f}s, CPU {stages['decode_and_cut_cpu_s']:.2f}s")

    if not e2e:
        return
    if any("cpu_by_role" in r for r in e2e):
        roles = sorted({k for r in e2e for k in r.get("cpu_by_role", {})})
        print("\nEnd-to-end CPU seconds by process (Linux /proc, whole machine, during each run):\n")
        print("| Ray num_cpus, run | wall s | machine busy CPU s (of cores × wall) | " + " | ".join(roles) + " |")
        print("|---|---|---|" + "---|" * len(roles))
        for r in e2e:
            if "cpu_by_role" in r:
                print(f"| {r['ray_cpus']}, {r['run']} | {r['seconds']:.1f} | {r['machine_busy_cpu_s']:.1f} "
                      f"({cores * r['seconds']:.1f}) | "
                      + " | ".join(f"{r['cpu_by_role'].get(k, 0):.1f}" for k in roles) + " |")
    print("\nEnd-to-end timeline (seconds from run_ingest's start):\n")
    print("| Ray num_cpus, run | Ray start s | decode tasks (processes) | max concurrent | decode task median s "
          "| decode busy s | first decode → last decode | embed actor init | embed calls (busy s) "
          "| writes (last ends) | total | load avg before/after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in e2e:
        if "decode_tasks" not in r:
            continue
        print(f"| {r['ray_cpus']}, {r['run']} | {r['ray_start_s']:.1f} | {r['decode_tasks']} ({r['decode_processes']}) "
              f"| {r['decode_max_concurrent']} "
              f"| {r['decode_task_s_median']:.2f} | {r['decode_task_s_sum']:.1f} "
              f"| {r['first_decode_start_s']:.1f} → {r['last_decode_end_s']:.1f} "
              f"| {r.get('embed_init_start_s', float('nan')):.1f} → {r.get('embed_init_end_s', float('nan')):.1f} "
              f"| {r.get('embed_calls', 0)} ({r.get('embed_s_sum', 0):.2f}) "
              f"| {r.get('write_calls', 0)} ({r.get('write_end_s', float('nan')):.1f}) | {r['seconds']:.1f} "
              f"| {r['loadavg_before']:.1f} / {r['loadavg_after']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--source", choices=["shapes", "photo"], default="shapes")
    ap.add_argument("--side", type=int, default=160, help="shapes: source frame size (square), default 160")
    ap.add_argument("--width", type=int, default=640, help="photo: source width, default 640")
    ap.add_argument("--height", type=int, default=360, help="photo: source height, default 360")
    ap.add_argument("--repeat", type=int, default=1,
                    help="list every video this many times under new names (a larger corpus without generating it)")
    ap.add_argument("--seconds", type=float, default=5.5, help="video length; 5 s = one 80-frame clip at 16 fps")
    ap.add_argument("--fps-list", type=float, nargs="+", default=[16, 24, 25, 30, 30000 / 1001])
    ap.add_argument("--ray-cpus", type=int, nargs="*", default=[2, 4],
                    help="logical CPUs of a fresh local Ray, one cold (+ one warm) run each (default 2 4)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="ingest config override, e.g. --set frame_format=raw (default: encoder_from=small)")
    ap.add_argument("--timeout", type=float, default=170, help="watchdog per end-to-end run, seconds")
    ap.add_argument("--no-warm", action="store_true", help="no second (warm) run per Ray configuration")
    ap.add_argument("--skip-stages", action="store_true", help="skip the in-process stage breakdown")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write all measurements as JSON here")
    ap.add_argument("--from-json", type=Path, help="only print the tables of a run saved with --json")
    ap.add_argument("--against", type=Path,
                    help="side by side with the `pipelines/` package under this directory (another version)")
    ap.add_argument("--rounds", type=int, default=2, help="--against: rounds, alternating A B / B A (default 2)")
    ap.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)  # child of --against: existing corpus
    ap.add_argument("--phase", choices=["raw", "dac", "e2e"], help=argparse.SUPPRESS)  # child of --against
    ap.add_argument("--corpus-cache", type=Path,
                    help="build the corpus here once and reuse it on later runs with the same arguments")
    args = ap.parse_args(argv)
    if args.from_json:
        report(json.loads(args.from_json.read_text()))
        return 0
    cfg = load_ingest_config(None, ["encoder_from=small", *args.overrides])
    if args.phase:
        args.json.write_text(json.dumps(_phase(args, cfg), default=str))
        return 0
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lumiere-ingest-bench-") as tmp:
        work = Path(tmp)
        root = work / "corpus"
        t0 = time.perf_counter()
        key = json.dumps([args.videos, args.source, args.side, args.width, args.height, args.seconds,
                          args.fps_list, args.seed])
        if args.corpus_cache and (args.corpus_cache / "records.json").exists() \
                and json.loads((args.corpus_cache / "records.json").read_text())["key"] == key:
            root = args.corpus_cache
            records = json.loads((root / "records.json").read_text())["records"]
        else:
            if args.corpus_cache:
                root = args.corpus_cache
            records = make_videos(root, args)
            (root / "records.json").write_text(json.dumps({"key": key, "records": records}))
        if args.repeat > 1:
            root, records = repeat_corpus(root, records, args.repeat, work / "corpus-repeated")
        src_frames = sum(r["frames"] for r in records)
        say(f"corpus: {len(records)} videos, {src_frames} source frames, {time.perf_counter() - t0:.1f}s")
        files, _ = stage1_list.list_inputs(str(root), str(root / "captions.jsonl"), cfg, StorageOptions())
        assert len(files) == len(records) and all(f["has_caption"] for f in files), "captions not matched"
        paths = [f["source"] for f in files]

        raw_default = raw_decode(paths, 0)
        raw_one = raw_decode(paths, 1)
        raw_all = raw_decode_parallel(paths, os.cpu_count() or 1)
        assert raw_default["frames"] == src_frames == raw_all["frames"], (raw_default["frames"], src_frames)
        say(f"raw decode: {raw_default['frames_per_s']:.0f} frames/s (default threads), "
            f"{raw_one['frames_per_s']:.0f} frames/s (1 thread), {raw_all['frames_per_s']:.0f} frames/s "
            f"({raw_all['processes']} processes × 1 thread)")

        stages = None
        if not args.skip_stages:
            stages = stage_breakdown(files, cfg, str(work / "stage-out"))
            say(f"stages in-process: decode_and_cut {stages['decode_and_cut_s']:.1f}s")

        side = None
        if args.against:
            side = side_by_side(args, root, work)
        e2e = []
        for n in ([] if args.against else args.ray_cpus):
            for r in end_to_end(root, cfg, n, args.timeout, work, not args.no_warm):
                e2e.append(r)
                say(f"end to end, Ray num_cpus={n}, {r['run']}: {r['status']}, {r['seconds']:.1f}s "
                    f"(+{r['ray_start_s']:.1f}s Ray start)")

    data = {
        "meta": {"argv": sys.argv[1:], "python": platform.python_version(), "cores": os.cpu_count() or 1,
                 "videos": len(records), "repeat": args.repeat, "source": args.source, "size": records[0]["size"],
                 "seconds": args.seconds,
                 "fps_list": args.fps_list, "overrides": args.overrides, "source_frames": src_frames,
                 "loadavg_start": load0, "loadavg_end": os.getloadavg()[0], "config": cfg.model_dump(mode="json")},
        "raw_decode": {"default": raw_default, "one_thread": raw_one, "all_cores": raw_all},
        "stages": stages, "end_to_end": e2e,
        "side_by_side": side,
    }
    report(data)
    if args.json:
        args.json.write_text(json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
