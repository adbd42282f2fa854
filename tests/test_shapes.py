"""Moving-shapes corpus: files on disk, captions that match their content, determinism."""

import json

import numpy as np
import pytest

from lumiere.shapes import (
    COLORS,
    DIRECTIONS,
    SHAPES,
    ShapeSpec,
    analyse_clip,
    caption,
    make_corpus,
    parse_caption,
    render_clip,
)
from lumiere.video import read_video

COUNT, FRAMES, SIZE = 6, 16, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return out, make_corpus(out, count=COUNT, frames=FRAMES, size=SIZE, seed=0)


def test_files_and_captions_exist(corpus):
    out, records = corpus
    lines = (out / "captions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    assert len(records) == COUNT
    for i, r in enumerate(records):
        assert r["path"] == f"videos/shape_{i:05d}.mp4"
        assert (out / r["path"]).stat().st_size > 0
        parse_caption(r["caption"])  # every caption is in the vocabulary


def test_captions_match_content(corpus):
    out, records = corpus
    for r in records:
        frames, fps = read_video(out / r["path"])
        assert frames.shape == (FRAMES, SIZE, SIZE, 3)
        assert fps == pytest.approx(16)
        (spec,) = parse_caption(r["caption"])
        stats = analyse_clip(frames)
        assert stats["dominant_color"] == spec.color, r
        assert stats["direction"] == spec.direction, r
        assert np.hypot(*stats["displacement"]) > 0.3 * SIZE, r  # it really travels
        assert stats["smoothness"] < 1.0, r  # steady motion
        assert stats["area_cv"] < 0.2, r  # the shape stays whole (in frame)


@pytest.mark.parametrize("color", list(COLORS))
@pytest.mark.parametrize("shape", SHAPES)
def test_analyse_every_combination_in_memory(color, shape):
    """analyse_clip recovers colour and direction for every vocabulary word, before compression."""
    for i, direction in enumerate(DIRECTIONS):
        frames = render_clip([ShapeSpec(shape, color, direction)], FRAMES, SIZE, np.random.default_rng(i))
        stats = analyse_clip(frames)
        assert stats["dominant_color"] == color
        assert stats["direction"] == direction
        assert not np.isnan(stats["centroids"]).any()


def test_bounce_stays_in_frame():
    frames = render_clip(
        [ShapeSpec("square", "white", "right")], 64, SIZE, np.random.default_rng(0), bounce=True
    )
    stats = analyse_clip(frames)
    assert stats["area_cv"] < 0.1  # never clipped by the border
    assert not np.isnan(stats["centroids"]).any()


def test_caption_round_trip():
    one = [ShapeSpec("square", "red", "right")]
    two = one + [ShapeSpec("circle", "blue", "up")]
    assert caption(one) == "a red square moving right"
    assert caption(two) == "a red square moving right and a blue circle moving up"
    for specs in (one, two):
        assert parse_caption(caption(specs)) == specs
    for bad in (
        "a purple square moving right",
        "a red hexagon moving up",
        "a red square moving sideways",
        "red square",
        "",
    ):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_two_shape_captions(tmp_path):
    records = make_corpus(tmp_path, count=4, frames=4, size=16, seed=3, two_shape_prob=1.0)
    for r in records:
        specs = parse_caption(r["caption"])
        assert len(specs) == 2 and specs[0].color != specs[1].color


def test_same_seed_same_corpus(tmp_path, corpus):
    out, records = corpus
    again = make_corpus(tmp_path, count=COUNT, frames=FRAMES, size=SIZE, seed=0)
    assert again == records
    for r in records:
        a, _ = read_video(out / r["path"])
        b, _ = read_video(tmp_path / r["path"])
        # x264's threaded encoder may round a few pixels differently between runs: same content, not same bits
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 0.5
    other = make_corpus(tmp_path / "other", count=COUNT, frames=FRAMES, size=SIZE, seed=1)
    assert [r["caption"] for r in other] != [r["caption"] for r in records]
