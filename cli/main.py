"""`lumiere`: one command line for every user (data, train, generate, serve, k8s, demo).

Thin: each command parses its options, calls the stage's library function (lumiere for config/data/generate/
style, pipelines.ingest.job, pipelines.train.job, serve.launch, infra.kuberay through k8s.py, demo.py) and
prints.

Heavy imports (torch, ray, …) happen inside the commands so `lumiere --help` is instant. Problems with the
user's input (`LumiereError`, including config errors) print one line and exit 2, without a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from lumiere.errors import LumiereError

from .k8s import k8s_app

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Lumiere on Ray: curate video corpora, train space-time diffusion models, serve them.",
)
data_app = typer.Typer(no_args_is_help=True, help="Make and inspect datasets.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configs.")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(k8s_app, name="k8s")
style_app = typer.Typer(no_args_is_help=True, help="Stylized generation: fit a style from reference images.")
app.add_typer(style_app, name="style")

models_app = typer.Typer(no_args_is_help=True, help="The model registry (MLflow): versions and aliases.")
app.add_typer(models_app, name="models")

SET_HELP = "Override any config key, e.g. --set unet.base_channels=32 (repeatable)."


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


@config_app.command("show")
def config_show(
    name: str = typer.Argument("tiny", help="A named config (tiny, small, base) or a YAML path."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
):
    """Print the fully resolved config as YAML."""
    import yaml

    from lumiere.config import load_config

    cfg = load_config(name, set_)
    typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())


def _tracking_uri() -> str:
    # the same default as `lumiere train`: a SQLite store in the working directory
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@models_app.command("promote")
def models_promote(
    name: str = typer.Argument(..., help="Registered model, e.g. lumiere-stunet."),
    version: int = typer.Argument(..., min=1, help="The version to point the alias at."),
    alias: str = typer.Option("production", help="The alias to move (Serve loads models:/NAME@production)."),
):
    """Point an alias (production by default) at a version; the line printed names the version it had before."""
    from pipelines.train.job import promote

    typer.echo(promote(name, str(version), _tracking_uri(), alias))


@models_app.command("list")
def models_list(name: str = typer.Argument(..., help="Registered model, e.g. lumiere-stunet.")):
    """Every version of a registered model: its aliases, training step, run and source."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=_tracking_uri())
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    if not versions:
        raise LumiereError(f"no registered model {name!r} in {_tracking_uri()}; train one with `lumiere train`")
    aliases = client.get_registered_model(name).aliases or {}
    for v in versions:
        tags = ",".join(a for a, ver in sorted(aliases.items()) if str(ver) == str(v.version)) or "-"
        typer.echo(f"{name} version {v.version}  aliases {tags}  step {v.tags.get('lumiere.step', '?')}  "
                   f"run {v.run_id}  {v.source}")


@config_app.command("list")
def config_list():
    """List the named configs."""
    from lumiere.config import available_configs

    for name in available_configs():
        typer.echo(name)


@data_app.command("shapes")
def data_shapes(
    out: Path = typer.Option(..., help="Output directory (videos/ and captions.jsonl are written here)."),
    count: int = typer.Option(64, min=1, max=1_000_000, help="Number of clips."),
    frames: int = typer.Option(80, min=2, max=2000, help="Frames per clip."),
    size: int = typer.Option(64, min=16, max=1024, help="Square frame size in pixels (even)."),
    fps: float = typer.Option(16.0, min=1.0, max=120.0),
    seed: int = typer.Option(0),
    two_shape_prob: float = typer.Option(0.0, min=0.0, max=1.0, help="Chance of a clip with two shapes."),
    bounce: bool = typer.Option(False, help="Shapes bounce off the borders."),
):
    """Generate the moving-shapes demo corpus: captioned mp4 clips of coloured shapes moving."""
    from lumiere.shapes import make_corpus

    if size % 2:
        raise LumiereError(f"--size must be even (H.264 needs even frame sizes), got {size}")
    records = make_corpus(
        out, count, frames=frames, size=size, fps=fps, seed=seed, two_shape_prob=two_shape_prob, bounce=bounce
    )
    typer.echo(f"wrote {len(records)} clips ({frames} frames, {size}x{size}, {fps:g} fps) to {out}/videos")
    typer.echo(f"captions: {out}/captions.jsonl  e.g. {records[0]['caption']!r}")


@app.command()
def ingest(
    input: str = typer.Option(..., "--input", help="Directory or s3:// prefix of video files."),
    output: str = typer.Option(..., "--output", help="Directory or s3:// prefix for the shards."),
    captions: str | None = typer.Option(
        None,
        help="Sidecar captions (.jsonl/.csv/.parquet with path,caption); default: a .txt/.json beside each video.",
    ),
    config: Path | None = typer.Option(None, help="Ingest config YAML (see pipelines/ingest/config.py)."),
    address: str | None = typer.Option(None, help="Ray cluster address (default: start a local Ray)."),
    set_: list[str] = typer.Option([], "--set", help="Override an ingest config key, e.g. --set clip_frames=16."),
    limit: int | None = typer.Option(None, min=1, help="Only the first N video files (listing order): a sample."),
    dry_run: bool = typer.Option(False, help="List, check the resume state and config, say what would be "
                                 "processed; write nothing."),
    new_output_on_change: bool = typer.Option(
        False, help="When --output holds clips made with other settings, write to <output>-<config hash> instead "
        "of refusing (the same settings find that output again on a re-run)."),
):
    """Turn a video corpus into Parquet shards of fixed-length clips (Ray Data); re-run to resume."""
    from pipelines.ingest.config import load_ingest_config
    from pipelines.ingest.job import run_ingest

    cfg = load_ingest_config(config, set_)
    report = run_ingest(input, output, captions, cfg, address=address, limit=limit, dry_run=dry_run,
                        new_output_on_change=new_output_on_change)
    if dry_run:
        return
    small = report.get("rejected_files_by_reason", {}).get("too_small", 0)
    if small:
        typer.echo(f"{small} file(s) rejected as too_small (shorter side below min_side={cfg.min_side}); for small "
                   "sources such as `lumiere data shapes` (64x64): --set min_side=64 --set size=64 --set hr_size=null")
    if report["clips"] == 0:
        _echo("warning: no clip passed the filters; see rejects.parquet and report.json for the reasons")


@app.command(context_settings={"allow_extra_args": False})
def train(
    kind: str = typer.Argument(..., help="t2i (the 2D prior), stunet (inflate a t2i checkpoint) or ssr "
                               "(the super-resolution model, on the high-resolution copies)."),
    data: str = typer.Option(..., help="An ingestion output (directory or s3:// prefix with manifest.json)."),
    output: str = typer.Option(..., help="Run directory or s3://bucket/prefix (AWS_* settings as for ingest): Ray "
                               "Train state and checkpoints/latest."),
    config: str = typer.Option("small", help="A named config (tiny, small, base) or a YAML path."),
    init_from: str | None = typer.Option(None, help="Checkpoint dir, a run's output dir (local or s3://), or a "
                                         "models:/ URI."),
    num_workers: int = typer.Option(1, min=1, help="Ray Train workers (DDP, or FSDP with "
                                    "--set train.parallelism=fsdp)."),
    cpus_per_worker: int = typer.Option(1, min=1, help="CPUs each worker holds and runs torch threads on (CPU "
                                        "training: e.g. 1 worker x 2 CPUs instead of 2 x 1)."),
    gpu: bool = typer.Option(False, help="One GPU per worker, bf16 autocast, nccl."),
    compile: bool = typer.Option(False, help="torch.compile the model (GPU only)."),
    max_steps: int | None = typer.Option(None, min=1, help="Shorthand for --set train.max_steps=N."),
    batch_size: int | None = typer.Option(None, min=1, help="Per-worker batch (train.batch_size)."),
    lr: float | None = typer.Option(None, min=0.0, help="Peak learning rate (train.lr)."),
    run_name: str | None = typer.Option(None, help="Re-using a run name resumes that run."),
    address: str | None = typer.Option(
        None, help="http://HOST:8265 submits through the Ray Jobs API; HOST:PORT joins a cluster as driver."
    ),
    max_failures: int = typer.Option(3, min=0, help="Worker failures survived by restoring the last checkpoint."),
    sample_every: int | None = typer.Option(
        None, min=0, help="Steps between sample videos, rendered by a Ray task off the training gang and logged "
        "to MLflow (default: train.checkpoint_every; 0: none)."),
    sample_gpus: float = typer.Option(0.0, min=0.0, help="GPUs a sample render reserves (default 0: a CPU)."),
    resource_timeout: float = typer.Option(
        1800, min=1, help="On a cluster: seconds to wait for the workers' CPUs/GPUs (e.g. an autoscaling GPU group "
        "starting nodes) before the run fails with a message."),
    system_metrics: float = typer.Option(
        10.0, "--system-metrics-every", min=0.0,
        help="Seconds between MLflow system-metric samples (CPU, memory, GPU), one sampler per node; 0: off."),
    conditional: bool = typer.Option(False, help="stunet: the 7-channel ⟨J, C, M⟩ model for i2v, inpainting, "
                                     "cinemagraphs and extension (stunet.conditional=true)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
):
    """Train the text-to-image prior, the STUNet or the SSR on Ray Train, tracked in MLflow."""
    from lumiere.config import load_config

    if conditional and kind != "stunet":
        raise LumiereError("--conditional applies to `lumiere train stunet` only")
    overrides = list(set_) + (["stunet.conditional=true"] if conditional else [])
    for key, value in (("train.max_steps", max_steps), ("train.batch_size", batch_size), ("train.lr", lr)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(config, overrides)
    if address and address.startswith(("http://", "https://")):
        from pipelines.train.submit import submit_and_follow

        argv = [a for a in sys.argv[1:]]
        raise typer.Exit(submit_and_follow(address, argv))
    from pipelines.train.job import run_training

    run_training(kind, data, output, cfg, init_from=init_from, num_workers=num_workers,
                 cpus_per_worker=cpus_per_worker, gpu=gpu,
                 run_name=run_name, address=address, compile=compile, max_failures=max_failures,
                 sample_every=sample_every, sample_num_gpus=sample_gpus, resource_timeout_s=resource_timeout,
                 system_metrics_interval_s=system_metrics)


def _load_media(path: Path | None, what: str, cfg, kind: str):
    """--image / --video / --mask files -> uint8 arrays, or a one-line error naming the option."""
    if path is None:
        return None
    from lumiere.video import VideoReadError, read_image, read_video

    try:
        if kind == "video" or (kind == "mask" and path.suffix.lower() in (".mp4", ".mov", ".webm", ".mkv")):
            frames, _ = read_video(path, fps=cfg.video.fps)
            return frames if kind == "video" else frames.max(axis=-1)  # a mask video: bright = region
        return read_image(path, what=f"{what} {path}", mode="L" if kind == "mask" else "RGB")
    except (VideoReadError, ValueError) as e:
        raise LumiereError(f"--{what}: {e}") from None


@app.command()
def generate(
    prompt: str = typer.Option(..., help="What the video should show."),
    out: Path = typer.Option(..., help="Output .mp4 path."),
    checkpoint: Path | None = typer.Option(None, help="A checkpoint directory (t2i or stunet)."),
    config: str = typer.Option("tiny", help="Config used when no --checkpoint is given."),
    task: str = typer.Option("t2v", help="t2v, i2v, inpaint, cinemagraph, v2v or extend."),
    image: Path | None = typer.Option(None, help="i2v: the first frame; cinemagraph: the still image."),
    video: Path | None = typer.Option(None, help="inpaint / v2v: the clip to edit; extend: the clip to continue."),
    mask: Path | None = typer.Option(
        None, help="inpaint / cinemagraph: image (or video) whose white (or transparent) pixels mark the region."
    ),
    strength: float | None = typer.Option(None, help="v2v: how much to change, in (0, 1] (default 0.6)."),
    context_frames: int | None = typer.Option(None, min=1, help="extend: frames of the input that condition "
                                              "the continuation (default: a quarter of the clip)."),
    style: Path | None = typer.Option(None, help="A style directory from `lumiere style fit`."),
    style_strength: float = typer.Option(0.75, min=0.0, max=1.0, help="α in W = α·W_style + (1−α)·W_orig."),
    upsample: bool = typer.Option(False, help="Run the SSR with MultiDiffusion on the result (--ssr-checkpoint)."),
    ssr_checkpoint: Path | None = typer.Option(None, help="An ssr checkpoint for --upsample."),
    frames: int | None = typer.Option(None, min=1, max=1024, help="Frames (default: the config's)."),
    steps: int | None = typer.Option(None, min=1, max=1000, help="Sampling steps."),
    guidance: float | None = typer.Option(None, min=0.0, max=50.0, help="Classifier-free guidance scale."),
    sampler: str | None = typer.Option(None, help="ddim, dpmsolver++ or ddpm."),
    seed: int = typer.Option(0),
    spritesheet: Path | None = typer.Option(None, help="Also write a PNG grid of the frames."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
):
    """Generate a video (text-to-video, image-to-video, inpainting, cinemagraph, edit, extension) as an mp4."""
    from lumiere.config import load_config
    from lumiere.diffusion import SAMPLERS
    from lumiere.pipeline import TASKS, TextToVideo, Upsampler
    from lumiere.video import save_png, write_mp4
    from lumiere.video import spritesheet as make_sheet

    if out.suffix.lower() != ".mp4":
        raise LumiereError(f"--out must end in .mp4, got {out}")
    if sampler is not None and sampler not in SAMPLERS:
        raise LumiereError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if task not in TASKS:
        raise LumiereError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if not prompt.strip():
        raise LumiereError("--prompt is empty; describe the video to generate")
    if upsample and ssr_checkpoint is None and checkpoint is not None:
        raise LumiereError("--upsample needs --ssr-checkpoint (train one with `lumiere train ssr`)")
    if checkpoint is not None:
        if set_:
            raise LumiereError("--set applies to --config; a checkpoint brings its own config")
        gen = TextToVideo.from_checkpoint(checkpoint, device=device)
    else:
        gen = TextToVideo.random_init(load_config(config, set_), device=device)
    gen.model.check_frames(frames or gen.cfg.video.frames)  # fail before any output
    inputs = {
        "image": _load_media(image, "image", gen.cfg, "image"),
        "video": _load_media(video, "video", gen.cfg, "video"),
        "mask": _load_media(mask, "mask", gen.cfg, "mask"),
    }
    if checkpoint is None:
        _echo(f"note: no --checkpoint given: using a RANDOMLY INITIALISED {gen.cfg.name} model (output is noise)")
    _echo(f"model: {gen.source}; task {task}")
    result = gen.generate(
        [prompt], task=task, **{k: v for k, v in inputs.items() if v is not None}, strength=strength,
        context_frames=context_frames, style=str(style) if style else None, style_strength=style_strength,
        frames=frames, steps=steps, guidance_scale=guidance, sampler=sampler, seed=seed,
        callback=lambda i, n: _echo(f"  step {i}/{n}") if i == n or i % 10 == 0 else None,
    )
    for note in result.notes:
        _echo(f"note: {note}")
    if upsample:
        ups = Upsampler.from_checkpoint(ssr_checkpoint, device) if ssr_checkpoint else Upsampler.random_init(gen.cfg)
        _echo(f"upsampling ×{ups.cfg.ssr.scale} with {ups.source}: MultiDiffusion windows of {ups.cfg.ssr.window} "
              f"frames, overlap {ups.cfg.ssr.overlap}")
        result = ups.upsample(result.videos, [prompt], seed=seed,
                              callback=lambda i, n: _echo(f"  ssr step {i}/{n}") if i == n or i % 10 == 0 else None)
    write_mp4(out, result.videos[0], fps=result.fps)
    video_out = result.videos[0]
    typer.echo(f"wrote {out} ({video_out.shape[0]} frames, {video_out.shape[2]}x{video_out.shape[1]}, "
               f"{result.fps:g} fps)")
    if spritesheet is not None:
        save_png(spritesheet, make_sheet(video_out))
        typer.echo(f"wrote {spritesheet}")


@style_app.command("fit")
def style_fit(
    checkpoint: Path = typer.Option(..., help="The t2i or stunet checkpoint whose prior is fine-tuned."),
    images: list[Path] = typer.Option(..., "--images", help="Style reference images (repeat the option)."),
    out: Path = typer.Option(..., help="The style directory to write."),
    prompt: str = typer.Option("", help="Caption for the style images (empty: the unconditional text)."),
    steps: int = typer.Option(100, min=1, max=100_000, help="Fine-tuning steps."),
    lr: float = typer.Option(2e-4, min=0.0, help="Learning rate."),
    seed: int = typer.Option(0),
):
    """Fine-tune the T2I prior on style images; generate with it via `lumiere generate --style DIR`."""
    import numpy as np

    from lumiere.checkpoint import load_model
    from lumiere.style import fit_style, prior_fingerprint, save_style
    from lumiere.text_encoder import TextEncoder
    from lumiere.video import fit_frames, read_image

    model, cfg, meta = load_model(checkpoint, use_ema=True, as_kind="stunet")
    pictures = []
    for path in images:
        try:
            pictures.append(fit_frames(read_image(path, what=f"style image {path}")[None], cfg.video.size)[0])
        except ValueError as e:
            raise LumiereError(f"--images: {e}") from None
    encoder = TextEncoder(cfg.text)
    context, pooled = encoder.encode_text([prompt])
    from lumiere.diffusion import Conditioning

    _echo(f"fitting a style on {len(pictures)} image(s) at {cfg.video.size}x{cfg.video.size} for {steps} steps "
          f"from {checkpoint}")
    state = fit_style(model.prior, np.stack(pictures), Conditioning(context, pooled), cfg.diffusion, steps=steps,
                      lr=lr, seed=seed,
                      callback=lambda i, loss: _echo(f"  step {i}/{steps} loss {loss:.4f}") if i % 25 == 0 or i == steps
                      else None)
    save_style(out, state, {"base_fingerprint": prior_fingerprint(model.prior), "base_checkpoint": str(checkpoint),
                            "prompt": prompt, "steps": steps, "lr": lr, "images": [str(p) for p in images]})
    typer.echo(f"wrote style {out}; use it with: lumiere generate --checkpoint {checkpoint} --style {out} "
               "--style-strength 0.75 ...")


@app.command()
def serve(
    checkpoint: str | None = typer.Option(None, help="A stunet (or t2i) checkpoint dir, or a training output dir."),
    model_uri: str | None = typer.Option(None, help="An MLflow model URI, e.g. models:/lumiere-stunet/1."),
    random_init: str | None = typer.Option(None, help="TESTS/DEMOS ONLY: serve a randomly initialised config."),
    ssr_checkpoint: str | None = typer.Option(None, help="An SSR checkpoint: adds the upsampled output size."),
    host: str = typer.Option("127.0.0.1", help="Bind address (the config's http_options.host, 0.0.0.0, is for "
                             "serve deploy / the RayService)."),
    port: int | None = typer.Option(None, min=1, max=65535, help="HTTP port (default: the config's, 8000)."),
    config: Path | None = typer.Option(None, help="Serve config YAML (default: serve/config.yaml)."),
    data_dir: Path | None = typer.Option(None, help="Jobs DB and artifacts directory (default: lumiere-serve)."),
    db_url: str | None = typer.Option(None, help="SQLAlchemy URL for jobs (env LUMIERE_DB_URL)."),
    artifacts: str | None = typer.Option(None, help="Directory or s3:// prefix for videos (env LUMIERE_ARTIFACTS)."),
    device: str | None = typer.Option(None, help="cpu or cuda (cuda: one GPU per model replica; env "
                                      "LUMIERE_DEVICE, default cpu)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve WITHOUT API keys (else LUMIERE_API_KEYS)."),
    set_: list[str] = typer.Option([], "--set", help="Config overrides for --random-init."),
):
    """Serve the OpenAI-compatible Videos API (/v1/videos) and a web page on Ray Serve."""
    from serve.launch import run_server

    flags = {"checkpoint": checkpoint, "model_uri": model_uri, "random_init": random_init,
             "ssr_checkpoint": ssr_checkpoint, "data_dir": str(data_dir) if data_dir else None, "db_url": db_url,
             "artifacts": artifacts, "device": device, "no_auth": no_auth, "set": list(set_)}
    run_server(config, flags, host, port, echo=_echo)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("demo-output"), help="Where the corpus, shards, runs, MLflow store and videos "
                                 "go (a re-run replaces the demo's own outputs there)."),
    config: str = typer.Option("small", help="Model config to train."),
    clips: int = typer.Option(120, min=4, help="Clips in the generated corpus."),
    t2i_steps: int = typer.Option(1000, min=1, help="Ray Train steps for the 2D prior."),
    stunet_steps: int = typer.Option(600, min=1, help="Ray Train steps for the STUNet's temporal layers."),
    num_workers: int = typer.Option(1, min=1, help="Ray Train workers per training job (DDP when more than one)."),
    cpus_per_worker: int = typer.Option(2, min=1, help="CPUs (torch threads) per Ray Train worker. On 2 cores 1 "
                                        "worker x 2 CPUs trains the STUNet 1.12x faster than 2 x 1 "
                                        "(benchmarks/demo_workers.py); --num-workers 2 --cpus-per-worker 1 shows DDP."),
    prompt: list[str] = typer.Option(
        [], help="Text-to-video prompts to request (repeatable; default: every colour x direction of the corpus, "
                 "scored); one image-to-video request is added.",
    ),
    sample_steps: int | None = typer.Option(None, min=1, help="Sampling steps per video (default: the config's)."),
    port: int = typer.Option(0, min=0, help="Port for the Videos API on 127.0.0.1 (0: a free one)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
):
    """The main job end to end on CPU: corpus -> ingest (Ray Data) -> train t2i + STUNet (Ray Train, MLflow) ->
    serve (Ray Serve) -> videos through the API (openai SDK)."""
    from .demo import default_prompts, run_demo

    run_demo(workdir, config, set_, clips, t2i_steps, stunet_steps, prompt or default_prompts(),
             num_workers=num_workers, cpus_per_worker=cpus_per_worker, sample_steps=sample_steps, port=port)


# Ray Train's placement-group cleaner asks the State API whether the controller is alive once a second and logs
# a warning each time that fails, which it always does on a local Ray without a dashboard (ours): dozens of
# identical lines per run. Ray's documented log filter drops them on the driver (read when ray is imported, so
# set before; a value the user set wins).
RAY_LOG_SKIP = r"Failed to query Ray Train Controller actor state"


def main() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", RAY_LOG_SKIP)
    try:
        app()
    except LumiereError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
