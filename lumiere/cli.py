"""`lumiere`: one command line for every user (data, train, generate, serve, k8s, demo).

Heavy imports (torch, ray, …) happen inside the commands so `lumiere --help` is instant. Problems with the
user's input (`LumiereError`, including config errors) print one line and exit 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from .errors import LumiereError

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

    from .config import load_config

    cfg = load_config(name, set_)
    typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())


@config_app.command("list")
def config_list():
    """List the named configs."""
    from .config import available_configs

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
    from .shapes import make_corpus

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
    config: Path | None = typer.Option(None, help="Ingest config YAML (see pipelines/ingest_config.py)."),
    address: str | None = typer.Option(None, help="Ray cluster address (default: start a local Ray)."),
    set_: list[str] = typer.Option([], "--set", help="Override an ingest config key, e.g. --set clip_frames=16."),
):
    """Turn a video corpus into Parquet shards of fixed-length clips (Ray Data); re-run to resume."""
    from pipelines.ingest import run_ingest
    from pipelines.ingest_config import load_ingest_config

    cfg = load_ingest_config(config, set_)
    report = run_ingest(input, output, captions, cfg, address=address)
    if report["clips"] == 0:
        _echo("warning: no clip passed the filters; see rejects.parquet and report.json for the reasons")


@app.command(context_settings={"allow_extra_args": False})
def train(
    kind: str = typer.Argument(..., help="t2i (the 2D prior) or stunet (inflate a t2i checkpoint)."),
    data: str = typer.Option(..., help="An ingestion output (directory or s3:// prefix with manifest.json)."),
    output: Path = typer.Option(..., help="Run directory: Ray Train state and checkpoints/latest."),
    config: str = typer.Option("small", help="A named config (tiny, small, base) or a YAML path."),
    init_from: str | None = typer.Option(None, help="Checkpoint dir, a run's output dir, or a models:/ URI."),
    num_workers: int = typer.Option(1, min=1, help="Ray Train workers (DDP)."),
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
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
):
    """Train the text-to-image prior or the STUNet on Ray Train, tracked in MLflow."""
    from .config import load_config

    overrides = list(set_)
    for key, value in (("train.max_steps", max_steps), ("train.batch_size", batch_size), ("train.lr", lr)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(config, overrides)
    if address and address.startswith(("http://", "https://")):
        from pipelines.submit import submit_and_follow

        argv = [a for a in sys.argv[1:]]
        raise typer.Exit(submit_and_follow(address, argv))
    from pipelines.train import run_training

    run_training(kind, data, str(output), cfg, init_from=init_from, num_workers=num_workers, gpu=gpu,
                 run_name=run_name, address=address, compile=compile, max_failures=max_failures)


@app.command()
def generate(
    prompt: str = typer.Option(..., help="What the video should show."),
    out: Path = typer.Option(..., help="Output .mp4 path."),
    checkpoint: Path | None = typer.Option(None, help="A checkpoint directory (t2i or stunet)."),
    config: str = typer.Option("tiny", help="Config used when no --checkpoint is given."),
    frames: int | None = typer.Option(None, min=1, max=1024, help="Frames (default: the config's)."),
    steps: int | None = typer.Option(None, min=1, max=1000, help="Sampling steps."),
    guidance: float | None = typer.Option(None, min=0.0, max=50.0, help="Classifier-free guidance scale."),
    sampler: str | None = typer.Option(None, help="ddim, dpmsolver++ or ddpm."),
    seed: int = typer.Option(0),
    spritesheet: Path | None = typer.Option(None, help="Also write a PNG grid of the frames."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
):
    """Generate a video from a text prompt and write it as an mp4."""
    from .config import load_config
    from .diffusion import SAMPLERS
    from .pipeline import TextToVideo
    from .video import save_png, write_mp4
    from .video import spritesheet as make_sheet

    if out.suffix.lower() != ".mp4":
        raise LumiereError(f"--out must end in .mp4, got {out}")
    if sampler is not None and sampler not in SAMPLERS:
        raise LumiereError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if not prompt.strip():
        raise LumiereError("--prompt is empty; describe the video to generate")
    if checkpoint is not None:
        if set_:
            raise LumiereError("--set applies to --config; a checkpoint brings its own config")
        gen = TextToVideo.from_checkpoint(checkpoint, device=device)
    else:
        gen = TextToVideo.random_init(load_config(config, set_), device=device)
    gen.model.check_frames(frames or gen.cfg.video.frames)  # fail before any output
    if checkpoint is None:
        _echo(f"note: no --checkpoint given: using a RANDOMLY INITIALISED {gen.cfg.name} model (output is noise)")
    _echo(f"model: {gen.source}")
    result = gen.generate(
        [prompt], frames=frames, steps=steps, guidance_scale=guidance, sampler=sampler, seed=seed,
        callback=lambda i, n: _echo(f"  step {i}/{n}") if i == n or i % 10 == 0 else None,
    )
    write_mp4(out, result.videos[0], fps=result.fps)
    video = result.videos[0]
    typer.echo(f"wrote {out} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]}, {result.fps:g} fps)")
    if spritesheet is not None:
        save_png(spritesheet, make_sheet(video))
        typer.echo(f"wrote {spritesheet}")


@app.command()
def demo(
    workdir: Path = typer.Option(Path("demo-output"), help="Where the corpus, checkpoints and videos go."),
    config: str = typer.Option("small", help="Model config to train."),
    clips: int = typer.Option(96, min=4, help="Clips in the generated corpus."),
    t2i_steps: int = typer.Option(1000, min=1, help="Training steps for the 2D prior."),
    stunet_steps: int = typer.Option(600, min=1, help="Training steps for the STUNet's temporal layers."),
    prompt: list[str] = typer.Option(
        ["a red square moving right", "a blue circle moving down"], help="Prompts to generate (repeatable)."
    ),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
):
    """The main job end to end on CPU: make a corpus, train the prior then the STUNet, generate videos."""
    from .demo import run_demo

    run_demo(workdir, config, set_, clips, t2i_steps, stunet_steps, prompt)


def main() -> None:
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
