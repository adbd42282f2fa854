"""`lumiere demo` end to end on a tiny budget: every stage runs and leaves its outputs."""

import json

from conftest import run_cli
from lumiere.checkpoint import read_meta
from lumiere.video import read_video


def test_demo_end_to_end_tiny(tmp_path):
    proc = run_cli("demo", "--workdir", str(tmp_path), "--config", "tiny", "--clips", "6",
                   "--t2i-steps", "6", "--stunet-steps", "4", "--prompt", "a red square moving right",
                   "--set", "train.log_every=2", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for stage in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert f"== {stage}" in proc.stdout
    assert len((tmp_path / "corpus" / "captions.jsonl").read_text().splitlines()) == 6
    cfg, meta = read_meta(tmp_path / "checkpoints" / "stunet")
    assert meta["kind"] == "stunet" and meta["step"] == 4 and meta["text_fingerprint"]
    assert json.loads((tmp_path / "checkpoints" / "t2i" / "meta.json").read_text())["step"] == 6
    video, fps = read_video(tmp_path / "videos" / "00_a_red_square_moving_right.mp4")
    assert video.shape == (cfg.video.frames, cfg.video.size, cfg.video.size, 3) and fps == 16
    assert (tmp_path / "videos" / "00_a_red_square_moving_right.png").exists()


def test_demo_failure_names_the_stage(tmp_path):
    (tmp_path / "corpus").write_text("a file where the corpus directory should be")
    proc = run_cli("demo", "--workdir", str(tmp_path), "--config", "tiny", "--clips", "4",
                   "--t2i-steps", "1", "--stunet-steps", "1")
    assert proc.returncode == 2
    assert "demo stage '1/5 corpus" in proc.stderr and "Traceback" not in proc.stderr
