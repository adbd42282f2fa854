"""`lumiere demo` end to end on a tiny budget: corpus -> ingest (Ray Data) -> train t2i + conditional STUNet (Ray
Train, 2 workers, MLflow) -> Serve -> text-to-video and image-to-video through the openai SDK -> mp4 + PNG files;
and a failing stage is named."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from lumiere.checkpoint import read_meta
from lumiere.video import read_video


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_end_to_end_tiny(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the demo's own store in WORKDIR
    proc = run_cli("demo", "--workdir", str(tmp_path), "--config", "tiny", "--clips", "6", "--t2i-steps", "4",
                   "--stunet-steps", "4", "--sample-steps", "2", "--prompt", "a red square moving right",
                   "--set", "train.log_every=2", timeout=540, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    for stage in ("1/7 corpus", "2/7 ingest", "3/7 train", "4/7 inflate", "5/7 serve", "6/7 request", "7/7 shut down"):
        assert f"== {stage}" in out
    assert "t2i step 4/4" in out and "stunet step 4/4" in out  # progress read back from MLflow
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in out
    # the real pieces left their outputs: shards + manifest, Ray Train checkpoints, MLflow store
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["clips"] == 6
    cfg, meta = read_meta(tmp_path / "runs" / "stunet" / "checkpoints" / "latest")
    assert meta["kind"] == "stunet" and meta["step"] == 4 and cfg.stunet.conditional
    assert read_meta(tmp_path / "runs" / "t2i" / "checkpoints" / "latest")[1]["step"] == 4
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlruns").is_dir()
    # one t2v and one i2v video, each an mp4 and a spritesheet PNG fetched through the API
    requests = json.loads((tmp_path / "videos" / "requests.json").read_text())
    assert [r["input_reference"] is not None for r in requests] == [False, True]
    assert requests[0]["prompt"] == "a red square moving right"
    for r in requests:
        video, fps = read_video(r["video"])
        assert video.shape == (cfg.video.frames, cfg.video.size, cfg.video.size, 3) and fps == cfg.video.fps
        sheet = Image.open(r["spritesheet"])
        assert sheet.format == "PNG" and sheet.size == (3 * cfg.video.size, 3 * cfg.video.size)  # 8 frames, 3x3
    # image-to-video: frame 0 is the corpus frame it was given (up to mp4 compression)
    ref = np.asarray(Image.open(tmp_path / "videos" / "01_reference.png").convert("RGB")).astype(int)
    assert np.abs(read_video(requests[1]["video"])[0][0].astype(int) - ref).mean() < 12
    assert "Demo finished" in out
    # the text-to-video result is scored against its prompt, and the accuracy over the prompts printed
    measured = r"measured +direction [01]/1 \((0|100)%\), colour [01]/1 \((0|100)%\) as prompted"
    assert re.search(measured, out), out[-2000:]


def test_demo_failure_names_the_stage(tmp_path):
    (tmp_path / "corpus").write_text("a file where the corpus directory should be")
    proc = run_cli("demo", "--workdir", str(tmp_path), "--config", "tiny", "--clips", "4",
                   "--t2i-steps", "1", "--stunet-steps", "1")
    assert proc.returncode == 2
    assert "demo stage '1/7 corpus" in proc.stderr and "Traceback" not in proc.stderr
