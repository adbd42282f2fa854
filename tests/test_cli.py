"""The `lumiere` CLI as a user runs it: real subprocesses, real files, one-line errors."""

import json

import numpy as np

from conftest import run_cli
from lumiere.video import read_video


def test_generate_writes_an_mp4_decord_reads_back(tmp_path):
    out = tmp_path / "clip.mp4"
    proc = run_cli("generate", "--prompt", "a red square moving right", "--config", "tiny", "--steps", "3",
                   "--out", str(out), "--spritesheet", str(tmp_path / "sheet.png"))
    assert proc.returncode == 0, proc.stderr
    assert "RANDOMLY INITIALISED" in proc.stderr
    frames, fps = read_video(out)
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
    assert abs(fps - 16) < 1e-3
    assert (tmp_path / "sheet.png").stat().st_size > 0


def test_generate_with_frames_override(tmp_path):
    out = tmp_path / "long.mp4"
    proc = run_cli("generate", "--prompt", "a blue circle moving up", "--frames", "16", "--steps", "2",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert read_video(out)[0].shape[0] == 16


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_config_value_is_one_line_naming_the_key(tmp_path):
    proc = run_cli("generate", "--prompt", "x", "--out", str(tmp_path / "a.mp4"), "--set", "unet.base_channels=abc")
    _one_line_error(proc, "unet.base_channels")


def test_indivisible_frames_is_one_line(tmp_path):
    proc = run_cli("generate", "--prompt", "x", "--frames", "7", "--out", str(tmp_path / "a.mp4"))
    _one_line_error(proc, "multiple of 2^1 = 2", "got 7 frames")


def test_missing_checkpoint_is_one_line(tmp_path):
    proc = run_cli("generate", "--prompt", "x", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "a.mp4"))
    _one_line_error(proc, "is not a Lumiere checkpoint")


def test_config_show_prints_resolved_yaml():
    proc = run_cli("config", "show", "small", "--set", "train.lr=0.01")
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.01" in proc.stdout and "base_channels: 16" in proc.stdout


def test_data_shapes_writes_corpus(tmp_path):
    proc = run_cli("data", "shapes", "--out", str(tmp_path), "--count", "3", "--frames", "16", "--size", "32")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert len(records) == 3
    frames, _ = read_video(tmp_path / records[0]["path"])
    assert frames.shape == (16, 32, 32, 3)
