"""Every generation task end to end: SDEdit and extension with a trained tiny conditional model, each task through
`lumiere generate`, the SSR with --upsample, stylization through `lumiere style fit`, and clear input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from typer.testing import CliRunner

from cli.main import app
from conftest import run_cli
from lumiere.checkpoint import save_checkpoint
from lumiere.config import load_config
from lumiere.errors import LumiereError
from lumiere.pipeline import TextToVideo
from lumiere.video import read_video, save_png, write_mp4

# A conditional tiny model (16×16) trained in-process on 4×4 patterns of dark and light cells whose colour drifts
# slowly: every weight trains (freeze_prior=false, no t2i stage), so a short run learns to continue a clip from its
# known frames. (Flat-colour clips were tried first: GroupNorm removes a flat frame's mean, so a model this small
# collapses to the dataset's mean colour and 150 steps did not learn them; benchmarks/RESULTS.md.)
SIZE = 16
TRAIN = ["stunet.conditional=true", "stunet.freeze_prior=false", "train.lr=0.003", "train.warmup_steps=20",
         "train.batch_size=8", "train.max_steps=300", "train.condition_types=[none,prefix_frames,first_frame]",
         f"video.size={SIZE}"]
PROMPT = "a pattern slowly changing colour"


def patterns(n: int, rng: np.random.Generator, frames: int = 8, grid: int = 4) -> np.ndarray:
    """n clips of a grid×grid pattern of dark (40) and light (215) cells, upsampled bilinearly, whose colour drifts
    by up to ±4 grey levels a frame: n t h w c uint8."""
    cells = rng.choice([40.0, 215.0], (n, 1, grid, grid, 1))
    low = np.clip(cells + rng.uniform(-4, 4, (n, 1, 1, 1, 3)) * np.arange(frames)[None, :, None, None, None], 0, 255)
    x = rearrange(torch.from_numpy(low).float(), "n t h w c -> (n t) c h w")
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return rearrange(x, "(n t) c h w -> n t h w c", n=n).round().clamp(0, 255).to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from lumiere.checkpoint import build_stunet
    from lumiere.diffusion import Conditioning
    from lumiere.text_encoder import TextEncoder
    from lumiere.trainer import TrainStep, clips_to_model

    cfg = load_config("tiny", TRAIN)
    clips = torch.from_numpy(patterns(256, np.random.default_rng(0)))
    encoder = TextEncoder(cfg.text)
    context, pooled = encoder.encode_text([PROMPT])
    torch.manual_seed(0)
    model = build_stunet(cfg)
    step = TrainStep(model, cfg, "stunet")
    g = torch.Generator().manual_seed(0)
    b = cfg.train.batch_size
    while step.step < cfg.train.max_steps:
        idx = torch.randint(0, len(clips), (b,), generator=g)
        step(clips_to_model(clips[idx]), Conditioning(context.expand(b, -1, -1), pooled.expand(b, -1)))
    path = tmp_path_factory.mktemp("cond") / "ckpt"
    save_checkpoint(path, model, cfg, "stunet", step=step.step, ema_state=step.ema.state_dict(model),
                    extra_meta={"text_fingerprint": encoder.fingerprint()})
    return path


@pytest.fixture(scope="module")
def gen(trained):
    return TextToVideo.from_checkpoint(trained)


def _clip(seed=5):
    return patterns(1, np.random.default_rng(100 + seed))[0]


def _diff(a, b) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def test_sdedit_with_a_tiny_strength_returns_the_input(gen):
    clip = _clip()
    small = gen.generate([PROMPT], task="v2v", video=clip, strength=0.02, steps=50).videos[0]
    large = gen.generate([PROMPT], task="v2v", video=clip, strength=1.0, steps=10).videos[0]
    assert _diff(small, clip) < 4.0  # one step at t≈20/1000: (nearly) the input, to a few grey levels
    assert _diff(large, clip) > 2 * _diff(small, clip)  # full strength ignores it
    none = gen.generate([PROMPT], task="v2v", video=clip, strength=0.001, steps=50).videos[0]
    assert np.array_equal(none, clip)  # below one sampling step: exactly the input


def test_extension_output_is_the_input_then_new_frames(gen):
    clip = _clip()
    out = gen.generate([PROMPT], task="extend", video=clip, context_frames=4, steps=5).videos[0]
    assert out.shape[0] == 8 + 8 - 4 and np.array_equal(out[:8], clip)
    other = gen.generate([PROMPT], task="extend", video=clip[::-1].copy(), context_frames=4, steps=5).videos[0]
    assert not np.array_equal(out[8:], other[8:])  # the continuation depends on the context frames


def test_extension_begins_where_the_input_ends(gen):
    seams, unconditioned = [], []
    for seed in range(3):
        clip = _clip(seed)
        out = gen.generate([PROMPT], task="extend", video=clip, context_frames=4, steps=20, seed=seed).videos[0]
        assert out.shape[0] == 8 + 8 - 4 and np.array_equal(out[:8], clip)  # the input, then 4 new frames
        seams.append(_diff(out[8], clip[-1]))
        free = gen.generate([PROMPT], steps=20, seed=seed).videos[0]
        unconditioned.append(_diff(free[0], clip[-1]))
    assert np.mean(seams) < 0.5 * np.mean(unconditioned), (seams, unconditioned)


def test_image_to_video_starts_from_the_image(gen):
    image = _clip()[0]
    video = gen.generate([PROMPT], task="i2v", image=image, steps=10).videos[0]
    assert np.array_equal(video[0], image)


def test_bad_task_inputs_are_clear_errors(gen, tiny_cfg):
    clip = _clip()
    with pytest.raises(LumiereError, match="needs image"):
        gen.generate(["x"], task="i2v")
    with pytest.raises(LumiereError, match="unknown task"):
        gen.generate(["x"], task="dance")
    with pytest.raises(LumiereError, match="mask is 8x8 but its input is 16x16"):
        gen.generate(["x"], task="inpaint", video=clip, mask=np.zeros((8, 8), np.uint8))
    with pytest.raises(LumiereError, match="has 4 frames; task v2v needs at least 8"):
        gen.generate(["x"], task="v2v", video=clip[:4])
    with pytest.raises(LumiereError, match="strength must be in"):
        gen.generate(["x"], task="v2v", video=clip, strength=1.5)
    with pytest.raises(LumiereError, match="does not take video"):
        gen.generate(["x"], task="i2v", image=clip[0], video=clip)
    with pytest.raises(LumiereError, match="needs a conditional model"):
        TextToVideo.random_init(tiny_cfg).generate(["x"], task="i2v", image=clip[0])
    resized = gen.generate(["x"], task="i2v", image=np.zeros((48, 64, 3), np.uint8), steps=1)
    assert any("resized from 64x48 to 16x16" in n for n in resized.notes)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    clip = _clip()
    write_mp4(d / "clip.mp4", clip, fps=16)
    save_png(d / "image.png", clip[0])
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2:] = 255  # the right half
    save_png(d / "mask.png", mask)
    return d


TASK_ARGS = {
    "t2v": [],
    "i2v": ["--image", "image.png"],
    "inpaint": ["--video", "clip.mp4", "--mask", "mask.png"],
    "cinemagraph": ["--image", "image.png", "--mask", "mask.png"],
    "v2v": ["--video", "clip.mp4", "--strength", "0.5"],
    "extend": ["--video", "clip.mp4", "--context-frames", "2"],
}


@pytest.mark.parametrize("task", list(TASK_ARGS))
def test_each_task_through_lumiere_generate_writes_a_valid_mp4(task, trained, media, tmp_path):
    out = tmp_path / f"{task}.mp4"
    args = [a if not a.endswith((".png", ".mp4")) else str(media / a) for a in TASK_ARGS[task]]
    result = CliRunner().invoke(app, ["generate", "--prompt", "a red square moving right", "--checkpoint",
                                      str(trained), "--task", task, *args, "--steps", "3", "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    frames, fps = read_video(out)
    assert frames.shape == ((8 + 6) if task == "extend" else 8, SIZE, SIZE, 3) and abs(fps - 16) < 1e-3
    if task == "inpaint":  # outside the region the input is kept (up to H.264 round trips)
        left = SIZE // 2 - 2
        assert _diff(frames[:, :, :left], read_video(media / "clip.mp4")[0][:, :, :left]) < 4


def test_upsample_runs_the_ssr_with_multidiffusion(tmp_path, tiny_cfg):
    from lumiere.checkpoint import build_ssr
    from lumiere.text_encoder import TextEncoder

    ssr = tmp_path / "ssr"
    save_checkpoint(ssr, build_ssr(tiny_cfg), tiny_cfg, "ssr",
                    extra_meta={"text_fingerprint": TextEncoder(tiny_cfg.text).fingerprint()})
    out = tmp_path / "up.mp4"
    result = CliRunner().invoke(app, ["generate", "--prompt", "a red square", "--config", "tiny", "--frames", "16",
                                      "--steps", "2", "--upsample", "--ssr-checkpoint", str(ssr), "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "MultiDiffusion windows of 8 frames, overlap 2" in result.output
    assert read_video(out)[0].shape == (16, 64, 64, 3)


def test_style_fit_then_generate_with_style(trained, media, tmp_path):
    style = tmp_path / "style"
    fit = CliRunner().invoke(app, ["style", "fit", "--checkpoint", str(trained), "--images", str(media / "image.png"),
                                   "--out", str(style), "--steps", "2"])
    assert fit.exit_code == 0, (fit.output, fit.exception)
    assert (style / "style.safetensors").exists()
    out = tmp_path / "styled.mp4"
    result = CliRunner().invoke(app, ["generate", "--prompt", "a red square", "--checkpoint", str(trained), "--style",
                                      str(style), "--style-strength", "0.8", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert read_video(out)[0].shape == (8, SIZE, SIZE, 3)


def test_cli_task_errors_are_one_line(trained, media, tmp_path):
    proc = run_cli("generate", "--prompt", "x", "--checkpoint", str(trained), "--task", "i2v",
                   "--out", str(tmp_path / "a.mp4"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == "error: task i2v needs image", proc.stderr
    (tmp_path / "bad.png").write_bytes(b"not a png")
    proc = run_cli("generate", "--prompt", "x", "--checkpoint", str(trained), "--task", "i2v", "--image",
                   str(tmp_path / "bad.png"), "--out", str(tmp_path / "a.mp4"))
    assert proc.returncode == 2 and "does not decode as an image" in proc.stderr and "Traceback" not in proc.stderr
