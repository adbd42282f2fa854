"""`lumiere demo` (`make demo`): the main job end to end through the real platform pieces, on CPU.

    1. corpus     make a captioned moving-shapes corpus (PyAV mp4 + captions.jsonl)     lumiere data shapes
    2. ingest     Ray Data: decode, filter, embed captions, Parquet shards               lumiere ingest
    3. t2i        Ray Train (N workers, DDP), MLflow: the 2D text-to-image prior         lumiere train t2i
    4. stunet     Ray Train, MLflow: inflate the prior, train the temporal layers as a   lumiere train stunet
                  conditional STUNet (text-to-video and image-to-video in one model)      --conditional
    5. serve      Ray Serve: the OpenAI-compatible Videos API on 127.0.0.1               lumiere serve
    6. requests   the official `openai` SDK: text-to-video prompts and one image-to-video from a corpus frame;
                  each result's mp4 and spritesheet PNG go to WORKDIR/videos/
    7. shut down  Serve and Ray (also when a stage fails)

Every stage calls the same Python entry point as its CLI command (run_ingest, run_training, the Serve app of
`lumiere serve`), in one local Ray instance. Every stage prints progress; a failure stops with a message naming
the stage. A re-run starts over: the demo replaces what an earlier run left in WORKDIR (and only that).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path

from lumiere.errors import LumiereError

# what the demo writes under WORKDIR; a re-run removes these first (nothing else in WORKDIR is touched)
OUTPUTS = ("corpus", "shards", "runs", "serve", "videos", "mlruns", "mlflow.db")


def default_prompts() -> list[str]:
    """Every colour × direction of the shapes vocabulary, shapes in rotation (as benchmarks/quality_shapes.py
    scores): the demo's measured direction accuracy is over all of them, not a hand-picked few."""
    from lumiere.shapes import COLORS, DIRECTIONS, SHAPES

    pairs = [(c, d) for c in COLORS for d in DIRECTIONS]
    return [f"a {c} {SHAPES[i % len(SHAPES)]} moving {d}" for i, (c, d) in enumerate(pairs)]


@contextlib.contextmanager
def stage(name: str):
    print(f"\n== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        yield
    except LumiereError as e:
        raise LumiereError(f"demo stage '{name}' failed: {e}") from None
    except Exception as e:  # any crash in a stage is reported by stage name, with its cause
        raise LumiereError(f"demo stage '{name}' failed: {type(e).__name__}: {e}") from e
    except KeyboardInterrupt:
        raise LumiereError(f"demo stage '{name}' interrupted") from None
    print(f"   done in {time.perf_counter() - t0:.1f}s", flush=True)


@contextlib.contextmanager
def follow_training(tracking_uri: str, kind: str, run_name: str, max_steps: int, every_s: float = 3.0):
    """Print a training run's progress while it runs, from the metrics its rank-0 worker logs to MLflow."""
    import mlflow

    stop = threading.Event()
    t0 = time.perf_counter()

    def follow():
        client, run_id, last = mlflow.MlflowClient(tracking_uri=tracking_uri), None, 0
        done = False
        while not done:
            done = stop.wait(every_s)  # one last look after the run has ended
            try:
                if run_id is None:
                    exp = client.get_experiment_by_name(f"lumiere-{kind}")
                    runs = client.search_runs([exp.experiment_id], f"tags.`lumiere.run_name` = '{run_name}'") \
                        if exp else []
                    if not runs:
                        continue
                    run_id = runs[0].info.run_id
                metrics = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
                           for k in ("loss", "lr", "samples_per_s")}
                # a step is shown once all three are in: rank 0 logs them one call at a time, a look between
                # two calls would print the step with a missing value
                complete = set(metrics["loss"]) & set(metrics["lr"]) & set(metrics["samples_per_s"])
                for step in sorted(s for s in complete if s > last):
                    print(f"   {kind} step {step}/{max_steps}  loss {metrics['loss'][step]:.4f}  "
                          f"lr {metrics['lr'][step]:.2e}  {metrics['samples_per_s'][step]:.1f} samples/s  "
                          f"({time.perf_counter() - t0:.0f}s)", flush=True)
                    last = step
            except Exception:  # progress display only: never fail the stage over it
                continue

    thread = threading.Thread(target=follow, name=f"follow-{run_name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(frame) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def _measured(video, prompt: str) -> tuple[str, dict | None]:
    """What `shapes.analyse_clip` sees in a generated video, against what the prompt asked for: a line, and
    {"color": ok, "direction": ok} when the prompt is in the shapes vocabulary (else None)."""
    from lumiere.shapes import analyse_clip, parse_caption

    a = analyse_clip(video)
    seen = f"{a['dominant_color'] or 'no shape'}, moving {a['direction'] or 'nowhere'}"
    try:
        want = parse_caption(prompt)[0]
    except ValueError:
        return f"measured: {seen}", None
    score = {"color": a["dominant_color"] == want.color, "direction": a["direction"] == want.direction}
    ok = score["color"] and score["direction"]
    line = f"measured: {seen} ({'as prompted' if ok else f'prompt: {want.color}, moving {want.direction}'})"
    return line, score


def accuracy_line(scores: list[dict]) -> str:
    """'direction 18/20 (90%), colour 20/20 (100%) as prompted' over the text-to-video requests scored."""
    n = len(scores)
    d, c = sum(s["direction"] for s in scores), sum(s["color"] for s in scores)
    return f"direction {d}/{n} ({d / n:.0%}), colour {c}/{n} ({c / n:.0%}) as prompted"


def demo_ingest_config(cfg):
    """The demo's ingestion settings for a model config `cfg`: the corpus's own frame count, size and fps, one clip
    per video, no SSR copy; the text encoder is the model config's (its fingerprint goes into the manifest and
    training checks it)."""
    from pipelines.ingest.config import IngestConfig

    # The corpus is single-shot synthetic clips, with no boundary to find: the colour-histogram detector
    # (~0.05 ms per frame) instead of TransNetV2 (~20 ms per frame, and a 100-frame window per file); and
    # every generated clip is wanted, also two that happen to look alike (no near-duplicate filter)
    return IngestConfig(clip_frames=cfg.video.frames, size=cfg.video.size, min_side=cfg.video.size, hr_size=None,
                        text=cfg.text, fps=cfg.video.fps, shot_detector="histogram", near_dedup="none")


def demo_stunet_config(config: str, overrides: list[str], steps: int, num_workers: int):
    """The demo's STUNet run: conditional from the start, inflated straight from the prior. The served model must
    do image-to-video (a conditional model) and text-to-video (the same model with a zero condition); an
    unconditional run followed by a conditional fine-tune would pay a second Ray Train start-up and split the step
    budget. Training only the two condition types the demo asks for ("none" = t2v, "first_frame" = i2v) gives each
    half of the steps instead of a fifth."""
    from lumiere.config import load_config

    # 8 clips per step in all (8 // workers each: exactly 8 on 1, 2, 4 or 8 workers): a STUNet step runs all 16
    # frames of every clip, ~6x the prior's step; within the ~15-minute budget that buys 600 updates, not ~420 at 16.
    # No top-noise phase: `small`'s 800 steps of it would be the whole run, and the plateau it shortens
    # needs more steps than the demo has (benchmarks/RESULTS.md run V)
    return load_config(config, [f"train.batch_size={max(1, 8 // num_workers)}", "diffusion.top_noise_steps=0",
                                *overrides, f"train.max_steps={steps}", "stunet.conditional=true",
                                "train.condition_types=[none, first_frame]"])


def _clean(workdir: Path) -> None:
    for name in OUTPUTS:
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists() and path.suffix == ".db":
            path.unlink()


def run_demo(workdir: Path, config: str, overrides: list[str], count: int, t2i_steps: int, stunet_steps: int,
             prompts: list[str], num_workers: int = 1, cpus_per_worker: int = 2, sample_steps: int | None = None,
             port: int = 0) -> dict:
    """Run the demo; returns {"videos": [mp4 paths], "spritesheets": [png paths], "mlflow": uri, ...}."""
    from lumiere.config import load_config

    cfg = load_config(config, overrides)
    workdir = Path(workdir).resolve()
    frames, size, fps = cfg.video.frames, cfg.video.size, cfg.video.fps
    print(f"Lumiere demo: config '{cfg.name}' ({frames} frames, {size}x{size}, {fps:g} fps), {count} clips, "
          f"t2i {t2i_steps} + stunet {stunet_steps} steps on {num_workers} Ray Train worker(s) x {cpus_per_worker} "
          f"CPU(s); output in {workdir}/",
          flush=True)
    # one MLflow store for the demo's runs, in WORKDIR (MLFLOW_TRACKING_URI, when set, wins, as for lumiere train)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}"
    t_start = time.perf_counter()
    started_ray = False
    result: dict = {"videos": [], "spritesheets": [], "scores": [], "mlflow": tracking_uri}
    try:
        with stage(f"1/7 corpus: {count} moving-shapes clips ({frames} frames, {size}x{size})"):
            from lumiere.shapes import make_corpus

            if workdir.exists() and not workdir.is_dir():
                raise LumiereError(f"{workdir} exists and is not a directory")
            workdir.mkdir(parents=True, exist_ok=True)
            _clean(workdir)
            corpus = workdir / "corpus"
            records = make_corpus(corpus, count, frames=frames, size=size, fps=fps, seed=cfg.train.seed)
            print(f"   {corpus}/videos/*.mp4, captions {corpus}/captions.jsonl (e.g. {records[0]['caption']!r})")

        import ray

        if not ray.is_initialized():
            # one local Ray for every stage (oversubscribed logical CPUs, as `lumiere ingest/train` start it); the
            # workers' own logs stay in /tmp/ray/session_latest/logs: training progress is read back from MLflow
            ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 2)), include_dashboard=False,
                     log_to_driver=False, logging_level="WARNING")
            started_ray = True

        with stage("2/7 ingest (Ray Data): decode, filter, embed captions, write Parquet shards"):
            from pipelines.ingest.job import run_ingest

            shards = workdir / "shards"
            report = run_ingest(str(corpus), str(shards), str(corpus / "captions.jsonl"), demo_ingest_config(cfg))
            if not report.get("clips"):
                raise LumiereError(f"no clip passed the filters; see {shards}/report.json")

        _prepare_mlflow(tracking_uri, workdir)
        os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri)
        from pipelines.train.job import run_training

        layout = f"{num_workers} worker(s) x {cpus_per_worker} CPU(s)"
        with stage(f"3/7 train the 2D text-to-image prior (Ray Train, {layout}, {t2i_steps} steps)"):
            # 16 images per step in all (16 // workers each: exactly 16 on 1, 2, 4, 8 or 16 workers)
            t2i_cfg = load_config(config, [f"train.batch_size={max(1, 16 // num_workers)}", *overrides,
                                           f"train.max_steps={t2i_steps}"])
            with follow_training(tracking_uri, "t2i", "demo-t2i", t2i_steps):
                t2i = run_training("t2i", str(shards), str(workdir / "runs" / "t2i"), t2i_cfg,
                                   num_workers=num_workers, cpus_per_worker=cpus_per_worker, run_name="demo-t2i")
        with stage(f"4/7 inflate to a conditional STUNet and train its temporal layers (Ray Train, {layout}, "
                   f"{stunet_steps} steps)"):
            st_cfg = demo_stunet_config(config, overrides, stunet_steps, num_workers)
            with follow_training(tracking_uri, "stunet", "demo-stunet", stunet_steps):
                stunet = run_training("stunet", str(shards), str(workdir / "runs" / "stunet"), st_cfg,
                                      init_from=t2i["checkpoint"], num_workers=num_workers,
                                      cpus_per_worker=cpus_per_worker, run_name="demo-stunet")
        result.update(t2i=t2i, stunet=stunet)

        with stage("5/7 serve the Videos API (Ray Serve, OpenAI-compatible /v1/videos)"):
            base, api_key = _start_serve(stunet["checkpoint"], workdir / "serve", port)
            result["url"] = base

        with stage(f"6/7 request {len(prompts)} text-to-video + 1 image-to-video through the API (openai SDK)"):
            jobs = [(p, None) for p in prompts]
            ref = records[0]  # image-to-video: frame 0 of a corpus clip, with that clip's caption
            jobs.append((ref["caption"], corpus / ref["path"]))
            _request(base, api_key, jobs, workdir / "videos", cfg, sample_steps, result)
    finally:
        if started_ray:
            import ray

            print("\n== 7/7 shut down Serve and Ray", flush=True)
            with contextlib.suppress(Exception):
                from ray import serve

                serve.shutdown()
            ray.shutdown()
    minutes = (time.perf_counter() - t_start) / 60
    print(f"\nDemo finished in {minutes:.1f} min. Outputs:")
    if result.get("accuracy"):
        print(f"   measured     {result['accuracy']} ({len(result['scores'])} text-to-video prompts)")
    print(f"   corpus       {workdir}/corpus")
    print(f"   shards       {workdir}/shards (manifest.json, report.json)")
    print(f"   checkpoints  {result['t2i']['checkpoint']}\n                {result['stunet']['checkpoint']}")
    for mp4, png in zip(result["videos"], result["spritesheets"], strict=True):
        print(f"   video        {mp4}  (+ {Path(png).name})")
    print("MLflow runs (demo-t2i, demo-stunet: params, metrics, sample videos, registered models):")
    print(f"   mlflow ui --backend-store-uri {tracking_uri}")
    print("Serve the model yourself:")
    print(f"   lumiere serve --checkpoint {result['stunet']['checkpoint']} --no-auth")
    return result


def _prepare_mlflow(tracking_uri: str, workdir: Path) -> None:
    """With the demo's own SQLite store, create its experiments with artifacts under WORKDIR/mlruns (else MLflow
    puts them in ./mlruns of whatever directory the demo was started from)."""
    if tracking_uri != f"sqlite:///{workdir / 'mlflow.db'}":
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    for kind in ("t2i", "stunet"):
        name = f"lumiere-{kind}"
        if client.get_experiment_by_name(name) is None:
            client.create_experiment(name, artifact_location=(workdir / "mlruns" / kind).as_uri())


def _start_serve(checkpoint: str, data_dir: Path, port: int) -> tuple[str, str]:
    """Start the app `lumiere serve` starts (serve.launch.plan + serve.app.build_app) on 127.0.0.1 in this Ray,
    with a one-off API key; returns (base URL, key)."""
    from ray import serve
    from ray.serve.schema import LoggingConfig

    from serve.app import build_app
    from serve.launch import LOCAL_HOST, plan

    api_key = "demo-" + secrets.token_urlsafe(16)
    _, entry, args = plan(None, {"checkpoint": checkpoint, "data_dir": str(data_dir), "api_keys": [api_key]})
    port = port or _free_port()
    quiet = LoggingConfig(log_level="WARNING", enable_access_log=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's "Started Serve ..." INFO lines
    serve.start(http_options={"host": LOCAL_HOST, "port": port}, logging_config=quiet)
    serve.run(build_app(args), name=entry.get("name", "lumiere"), route_prefix="/", logging_config=quiet)
    base = f"http://{LOCAL_HOST}:{port}"
    print(f"   serving {checkpoint} at {base}/v1 (web page {base}/); jobs and videos in {data_dir}")
    return base, api_key


def _request(base: str, api_key: str, jobs: list[tuple[str, Path | None]], out: Path, cfg, sample_steps: int | None,
             result: dict) -> None:
    import openai

    from lumiere.video import decode_mp4_bytes, read_video

    client = openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=2, timeout=120)
    out.mkdir(parents=True, exist_ok=True)
    seconds = f"{cfg.video.frames / cfg.video.fps:g}"
    extra = {"seed": 0, **({"num_inference_steps": sample_steps} if sample_steps else {})}
    for i, (prompt, source) in enumerate(jobs):
        kwargs: dict = {}
        if source is not None:
            frame = read_video(source)[0][0]
            kwargs["input_reference"] = ("reference.png", _png(frame), "image/png")
            ref_path = out / f"{i:02d}_reference.png"
            ref_path.write_bytes(_png(frame))
        t0 = time.perf_counter()
        video = client.videos.create_and_poll(prompt=prompt, seconds=seconds, size=f"{cfg.video.size}x{cfg.video.size}",
                                              poll_interval_ms=250, extra_body=extra, **kwargs)
        if video.status != "completed":
            message = video.error.message if video.error else video.status
            raise LumiereError(f"video {video.id} for {prompt!r} ended {video.status}: {message}")
        task = (video.model_extra or {}).get("task", "t2v")
        stem = out / f"{i:02d}_{task}_{'_'.join(prompt.split())[:60]}"
        mp4, png = stem.with_suffix(".mp4"), stem.with_suffix(".png")
        mp4.write_bytes(client.videos.download_content(video.id, variant="video").read())
        png.write_bytes(client.videos.download_content(video.id, variant="spritesheet").read())
        frames = decode_mp4_bytes(mp4.read_bytes())
        how = f"from {source.relative_to(source.parent.parent)} frame 0, " if source is not None else ""
        line, score = _measured(frames, prompt)
        print(f"   {task} {prompt!r} ({how}{video.id}, {time.perf_counter() - t0:.1f}s): {mp4.name} + .png; "
              f"{line}", flush=True)
        if score is not None and source is None:
            result["scores"].append({"prompt": prompt, **score})
        result["videos"].append(str(mp4))
        result["spritesheets"].append(str(png))
    if result["scores"]:
        result["accuracy"] = accuracy_line(result["scores"])
        print(f"   text-to-video, measured by shapes.analyse_clip: {result['accuracy']}", flush=True)
    (out / "requests.json").write_text(json.dumps(
        [{"prompt": p, "input_reference": str(s) if s else None, "video": v, "spritesheet": s2}
         for (p, s), v, s2 in zip(jobs, result["videos"], result["spritesheets"], strict=True)], indent=1))
