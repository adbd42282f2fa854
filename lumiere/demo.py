"""`lumiere demo`: the main job end to end, in-process on CPU.

    1. make a captioned moving-shapes corpus (PyAV mp4 + captions.jsonl)
    2. decode it with decord and embed the captions with the text encoder
    3. train the 2D text-to-image prior on single frames
    4. inflate it into a STUNet and train only the temporal layers on whole clips
    5. generate a video per prompt with the trained STUNet (mp4 + spritesheet PNG)

Every stage prints progress; a failure stops with a message naming the stage.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from .errors import LumiereError


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
    print(f"   done in {time.perf_counter() - t0:.1f}s", flush=True)


def load_clips(corpus: Path, frames: int):
    """Decode every clip of a shapes corpus: (clips uint8 n t h w c, captions)."""
    from .video import read_video

    clips, captions = [], []
    for line in (corpus / "captions.jsonl").read_text().splitlines():
        rec = json.loads(line)
        video, _ = read_video(corpus / rec["path"])
        if len(video) < frames:
            raise LumiereError(f"{rec['path']} has {len(video)} frames, fewer than the {frames} the model needs")
        clips.append(torch.from_numpy(video[:frames]))
        captions.append(rec["caption"])
    return torch.stack(clips), captions


def fit(model, kind, cfg, clips, cond, steps: int, out: Path, fingerprint: str):
    """Train `model` on in-memory clips with the shared TrainStep; save a checkpoint at the end."""
    from .checkpoint import save_checkpoint
    from .diffusion import Conditioning
    from .trainer import TrainStep, clips_to_model

    # the LR schedule decays over this run's steps, not the config's default max_steps
    cfg = cfg.model_copy(update={"train": replace(cfg.train, max_steps=steps)})
    train = TrainStep(model, cfg, kind)
    n = len(clips)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    t0, window = time.perf_counter(), []
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (cfg.train.batch_size,), generator=gen)
        metrics = train(clips_to_model(clips[idx]), Conditioning(cond.context[idx], cond.pooled[idx]))
        window.append(metrics["loss"])
        if step % cfg.train.log_every == 0 or step == steps:
            rate = step / (time.perf_counter() - t0)
            print(f"   {kind} step {step}/{steps}  loss {sum(window) / len(window):.4f}  "
                  f"lr {metrics['lr']:.2e}  {rate:.1f} steps/s", flush=True)
            window = []
    save_checkpoint(
        out, model, cfg, kind, step=train.step, ema_state=train.ema.state_dict(model),
        train_state=train.state_dict(), extra_meta={"text_fingerprint": fingerprint},
    )
    print(f"   checkpoint: {out}")
    return model


def run_demo(workdir: Path, config: str, overrides: list[str], count: int, t2i_steps: int,
             stunet_steps: int, prompts: list[str]) -> None:
    from .checkpoint import build_prior, build_stunet
    from .config import load_config
    from .diffusion import Conditioning
    from .pipeline import TextToVideo
    from .shapes import make_corpus
    from .text_encoder import TextEncoder
    from .video import save_png, spritesheet, write_mp4

    cfg = load_config(config, overrides)
    workdir = Path(workdir)
    torch.manual_seed(cfg.train.seed)
    print(f"Lumiere demo: config '{cfg.name}' ({cfg.video.frames} frames, {cfg.video.size}x{cfg.video.size}), "
          f"output in {workdir}/")

    with stage(f"1/5 corpus: {count} moving-shapes clips"):
        corpus = workdir / "corpus"
        make_corpus(corpus, count, frames=cfg.video.frames, size=cfg.video.size, fps=cfg.video.fps,
                    seed=cfg.train.seed)
        print(f"   {corpus}/captions.jsonl")
    with stage("2/5 decode clips (decord) and embed captions (open_clip text tower)"):
        clips, captions = load_clips(corpus, cfg.video.frames)
        encoder = TextEncoder(cfg.text)
        cond = Conditioning(*encoder.encode_text(captions))
        fingerprint = encoder.fingerprint()
        print(f"   {tuple(clips.shape)} uint8 clips; text features {tuple(cond.context.shape)}")
    with stage(f"3/5 train the 2D text-to-image prior ({t2i_steps} steps)"):
        prior = build_prior(cfg)
        print(f"   {sum(p.numel() for p in prior.parameters()):,} parameters")
        fit(prior, "t2i", cfg, clips, cond, t2i_steps, workdir / "checkpoints" / "t2i", fingerprint)
    with stage(f"4/5 inflate to a STUNet and train its temporal layers ({stunet_steps} steps)"):
        stunet = build_stunet(cfg, prior)
        trainable = sum(p.numel() for p in stunet.parameters() if p.requires_grad)
        print(f"   {trainable:,} trainable temporal parameters; prior frozen; "
              f"coarsest level sees {stunet.coarsest_frames(cfg.video.frames)} of {cfg.video.frames} frames")
        fit(stunet, "stunet", cfg, clips, cond, stunet_steps, workdir / "checkpoints" / "stunet", fingerprint)
    with stage(f"5/5 generate {len(prompts)} video(s)"):
        gen = TextToVideo.from_checkpoint(workdir / "checkpoints" / "stunet")
        result = gen.generate(prompts, seed=0)
        outputs = []
        for i, (p, video) in enumerate(zip(prompts, result.videos, strict=True)):
            stem = workdir / "videos" / f"{i:02d}_{'_'.join(p.split())[:60]}"
            write_mp4(stem.with_suffix(".mp4"), video, fps=result.fps)
            save_png(stem.with_suffix(".png"), spritesheet(video))
            outputs.append(stem)
            print(f"   {p!r}: {stem}.mp4  (+ .png spritesheet)")
    print("\nDemo finished. Outputs:")
    print(f"   corpus       {workdir}/corpus")
    print(f"   checkpoints  {workdir}/checkpoints/t2i, {workdir}/checkpoints/stunet")
    for stem in outputs:
        print(f"   video        {stem}.mp4")
    print(f"Try: lumiere generate --checkpoint {workdir}/checkpoints/stunet --prompt 'a green triangle moving up' "
          f"--out {workdir}/videos/mine.mp4")
