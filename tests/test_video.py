"""Video I/O: mp4 round trips through PyAV (write) and decord (read), resampling, tensor layout."""

import numpy as np
import pytest
import torch

from lumiere.video import (
    VideoReadError,
    decode_mp4_bytes,
    encode_mp4_bytes,
    frames_to_tensor,
    read_video,
    save_png,
    spritesheet,
    tensor_to_frames,
    write_mp4,
)


def smooth_pattern(t=12, h=32, w=48):
    """(t, h, w, 3) uint8 gradients that drift over time: smooth, so H.264 keeps it nearly exact."""
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    r = 40 + 150 * xx / w + 4 * tt
    g = 40 + 150 * yy / h
    b = 120 + 60 * np.sin(tt / t * np.pi) + 0 * xx
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def grey_levels(n, h=32, w=32):
    """Frame i is a uniform grey of level 8*i, so a decoded frame tells which source frame it is."""
    return np.repeat((8 * np.arange(n, dtype=np.uint8))[:, None, None, None], h * w * 3, axis=1).reshape(
        n, h, w, 3
    )


def frame_ids(frames):
    return np.round(frames.reshape(len(frames), -1).mean(axis=1) / 8).astype(int)


def test_round_trip(tmp_path):
    frames = smooth_pattern()  # width 48 also exercises the decord row-padding workaround
    path = tmp_path / "sub" / "dir" / "clip.mp4"  # parent dirs are created
    write_mp4(path, frames, fps=16)
    assert path.exists()
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp files left behind
    out, fps = read_video(path)
    assert out.dtype == np.uint8
    assert out.shape == frames.shape
    assert fps == pytest.approx(16)
    assert np.abs(out.astype(float) - frames.astype(float)).mean() < 3


@pytest.mark.parametrize("w", [16, 24, 48, 64])
def test_bytes_round_trip_every_width(w):
    """decode_mp4_bytes takes read_video's decord row-padding workaround (widths 16, 24, 48 failed before)."""
    frames = smooth_pattern(t=6, w=w)
    out = decode_mp4_bytes(encode_mp4_bytes(frames, fps=16))
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    assert out.shape == frames.shape
    assert np.abs(out.astype(float) - frames.astype(float)).mean() < 3
    for bad in (b"", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()):
        with pytest.raises(VideoReadError, match="cannot decode video bytes"):
            decode_mp4_bytes(bad)


@pytest.mark.parametrize("shape", [(4, 31, 32, 3), (4, 32, 33, 3)])
def test_odd_sizes_rejected(tmp_path, shape):
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "odd.mp4", np.zeros(shape, np.uint8))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((4, 32, 32, 3), np.float32),
        np.zeros((4, 32, 32), np.uint8),
        np.zeros((0, 32, 32, 3), np.uint8),
    ],
)
def test_bad_frames_rejected(tmp_path, frames):
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "bad.mp4", frames)


def test_corrupt_and_empty_files(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for path in (corrupt, empty, tmp_path / "missing.mp4"):
        with pytest.raises(VideoReadError, match=path.name):
            read_video(path)
    assert issubclass(VideoReadError, ValueError)


@pytest.mark.parametrize("src_fps", [30, 25])
def test_resample_to_16fps_picks_nearest_frames(tmp_path, src_fps):
    n = 30  # 1.0 s at 30 fps, 1.2 s at 25 fps
    path = tmp_path / f"grey{src_fps}.mp4"
    write_mp4(path, grey_levels(n), fps=src_fps)

    native, fps = read_video(path)
    assert fps == pytest.approx(src_fps)
    np.testing.assert_array_equal(frame_ids(native), np.arange(n))

    out, fps = read_video(path, fps=16)
    assert fps == 16
    expected_count = {30: 16, 25: 20}[src_fps]  # ceil(duration * 16)
    assert len(out) == expected_count
    # output frame k at time k/16 -> nearest source frame round(k * src_fps / 16), halves up
    expected = np.minimum(np.floor(np.arange(expected_count) * src_fps / 16 + 0.5).astype(int), n - 1)
    np.testing.assert_array_equal(frame_ids(out), expected)


def test_tensor_round_trip():
    frames = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    x = frames_to_tensor(frames)
    assert x.shape == (3, 5, 8, 6) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(tensor_to_frames(x), frames)
    # out-of-range values are clamped, not wrapped
    assert tensor_to_frames(torch.full((3, 1, 2, 2), 5.0)).min() == 255
    assert tensor_to_frames(torch.full((3, 1, 2, 2), -5.0)).max() == 0


def test_spritesheet(tmp_path):
    frames = np.full((5, 4, 6, 3), 200, np.uint8)
    sheet = spritesheet(frames)  # cols = ceil(sqrt(5)) = 3 -> 2 rows
    assert sheet.shape == (8, 18, 3)
    assert (sheet[4:, 12:] == 0).all()  # the missing sixth cell is black
    assert (sheet[:4] == 200).all()
    assert spritesheet(frames, cols=5).shape == (4, 30, 3)
    save_png(tmp_path / "a" / "sheet.png", sheet)
    assert (tmp_path / "a" / "sheet.png").stat().st_size > 0
