"""Configuration of `lumiere ingest`: YAML (optional) + `--set key=value` overrides, validated by pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lumiere.errors import ConfigError
from lumiere.text_encoder import TextEncoderConfig

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".gif")


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # clips
    fps: float = Field(16.0, gt=0, le=120)
    clip_frames: int = Field(80, ge=2, le=4096)
    size: int = Field(128, ge=8, le=4096)  # base resolution: shorter side scaled to this, centre-cropped square
    hr_size: int | None = Field(256, ge=8, le=8192)  # higher-resolution copy for SSR training; null: none
    frame_format: Literal["mp4", "raw"] = "mp4"  # how frames are stored in shards (docs/decisions.md)
    mp4_crf: int = Field(18, ge=0, le=51)
    # x264 preset of the clip re-encode: the largest per-file cost of ingestion (docs/decisions.md)
    mp4_preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                        "veryslow"] = "veryfast"
    # on top of the preset: no 8x8 inter partitions and x264's diamond motion search (lumiere.video
    # X264_FAST_ANALYSIS): 7-29% cheaper encodes for 0-8% larger clips, PSNR within 0.07 dB on natural content
    # (benchmarks/ingest_encoder.py; docs/decisions.md)
    mp4_fast_analysis: bool = True
    # filters (reason codes in pipelines/ingest/curation.py REASONS)
    min_side: int = Field(128, ge=1)  # too_small: source's shorter side below this
    # shot boundaries (pipelines/ingest/shots.py; measured in benchmarks/shot_boundaries.py): "transnetv2", the
    # pretrained TransNetV2 (hard cuts, fades and dissolves; ~18 ms of CPU per frame at 16 fps, so a GPU pays
    # off: shot_num_gpus), or "histogram", colour-histogram distance between consecutive frames (hard cuts only)
    shot_detector: Literal["transnetv2", "histogram"] = "transnetv2"
    transnet_threshold: float = Field(0.5, gt=0, lt=1)  # a frame is in a transition when TransNetV2's p is above
    cut_threshold: float = Field(0.5, gt=0, le=1)  # histogram: a cut where the histogram distance is above
    shot_trim_frames: int = Field(2, ge=0, le=64)  # frames dropped at both ends of every shot (at fps)
    static_threshold: float = Field(0.1, ge=0)  # static: mean |Δ| (0–255) between frames 4 apart below this
    black_max_fraction: float = Field(0.5, ge=0, le=1)  # black: more than this share of frames black
    blank_max_fraction: float = Field(0.5, ge=0, le=1)  # blank: more than this share of frames flat colour
    min_clip_score: float | None = None  # low_clip_score: CLIP text–keyframe cosine below; null disables
    missing_caption: Literal["reject", "keep"] = "reject"
    # duplicate: a file with the same bytes (SHA-256) as another is rejected, pointing at the kept one (the first
    # committed, else the first in listing order); "none" ingests every copy
    dedup: Literal["exact", "none"] = "exact"
    # near_duplicate: a clip whose content matches a clip already kept (in this run or committed before) is
    # rejected, pointing at the kept one. "frames": a fingerprint of the clip's frames (curation.clip_signature;
    # needs no model); "clip": the CLIP image embedding of its keyframe (meaningful with a pretrained encoder
    # only); "none": off. Similar when the cosine is at least near_dedup_threshold.
    near_dedup: Literal["frames", "clip", "none"] = "frames"
    near_dedup_threshold: float = Field(0.97, gt=0, le=1)
    # the index of kept clips is exact up to this many; past it, approximate (a faiss inverted file): each new clip
    # is compared with the kept clips of its near_dedup_nprobe nearest cells, stored in near_dedup_index_bits per
    # component (16: as exact as below the switch; 8: half the memory, cosines off by a few thousandths)
    # (benchmarks/near_dedup_index.py measures both)
    near_dedup_exact_max: int = Field(200_000, ge=0)
    near_dedup_nprobe: int = Field(32, ge=1)
    near_dedup_index_bits: Literal[8, 16] = 16
    # the approximate index is rebuilt (new cells, ~2·sqrt(n), trained on every kept clip) each time the kept clips
    # have grown this many times over since its cells were trained, so its search cost stays ~sqrt(n) (16-bit
    # only: 8-bit codes clipped to the old ranges cannot be read back exactly)
    near_dedup_retrain_growth: float = Field(4.0, gt=1)
    # a file longer than this is cut into time ranges of this length, each its own decode task, so a long film is
    # spread over the cluster's cores instead of being one straggler; clips do not cross a range's edge (at most
    # one clip's frames are lost per edge)
    range_seconds: float = Field(300.0, ge=10)
    # the time ranges of a remote (S3) file that run on one node share one local copy of it, in this directory
    # (null: <tmp>/lumiere-source-cache; put it on the node's local disk), bounded by source_cache_bytes (least
    # recently used copies no task holds are deleted first; 0 disables sharing: one copy per range)
    source_cache_dir: str | None = None
    source_cache_bytes: int = Field(32 * 2**30, ge=0)
    # how a decode task reads a remote (S3) file: "copy" to local disk (the node cache above), then decord; or
    # "ranges": PyAV reads the object in place, only the byte ranges its frames need (no local disk; a file cut
    # into ranges costs about its size once in all, on any number of nodes: pipelines/ingest/range_decode.py);
    # "auto": ranges for a file cut into time ranges (a long file, which PyAV decodes anyway once its frames
    # exceed decode_ahead_max_bytes, so a copy would only add downloads, disk and a wait for the whole object before
    # the first frame), copy for the rest (short files: one download, and decord decodes them up to 1.3x faster)
    remote_decode: Literal["auto", "copy", "ranges"] = "auto"
    remote_read_block_bytes: int = Field(4 * 2**20, ge=4096)  # bytes per ranged GET with remote_decode: ranges
    # the longest wait for the decoder's next chunk of frames (a hung or pathologically slow decoder), not a
    # limit on the file's length; 0 decodes in-process without a timeout
    decode_timeout_s: float = Field(120.0, ge=0)
    # decord's decoder thread decodes ahead of a slow consumer (the shot detector, the embedder) towards the file's
    # end and holds every frame; a local file (or time range) whose frames from its start to the file's end take
    # more than this at the decode size is decoded by PyAV instead, only as frames are asked for (0: always
    # PyAV, slower by 3-22 % on one thread: benchmarks/RESULTS.md "Remote decode"). Bounds a decode task's memory
    # whatever the video's length.
    decode_ahead_max_bytes: int = Field(256 * 2**20, ge=0)
    max_file_bytes: int = Field(8 * 2**30, ge=1)  # larger inputs are rejected as too_large
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS
    # text/image encoder: must be the one the models train with (its fingerprint goes into the manifest)
    encoder_from: str | None = "small"  # take `text` from this Lumiere config (tiny/small/base/…)
    text: TextEncoderConfig | None = None  # or give it explicitly (wins over encoder_from)
    # report: contact_sheets/accepted.png and one PNG per reject reason with up to this many sampled candidates
    # (each candidate with frames carries a ~4 KB thumbnail strip for them); 0: no sheets, no thumbnails
    contact_sheet_tiles: int = Field(48, ge=0, le=1024)
    # execution
    shard_clips: int = Field(64, ge=1)  # clips per Parquet shard
    embed_batch_size: int = Field(32, ge=1)
    embed_actors: int = Field(1, ge=1)
    embed_num_gpus: float = Field(0.0, ge=0)  # >0 puts the embedding actors on GPUs
    decode_num_cpus: float = Field(1.0, gt=0)
    # >0: each decode task also holds this share of a GPU and runs TransNetV2 on it (shot_detector: transnetv2)
    shot_num_gpus: float = Field(0.0, ge=0)
    # memory Ray reserves per decode task (MB); null: estimated from the decode size and clip length (a decode
    # task holds a few chunks of frames and one clip, whatever the video's length)
    decode_memory_mb: int | None = Field(None, ge=64)
    # threads of the decoder and of each x264 encode inside one decode task; 0 = the libraries' default (one
    # or more per core). 1 because Ray already runs one decode task per CPU, and on clips this size one
    # thread costs 16-45% less CPU than their default threading (docs/decisions.md, "Ingestion: one codec
    # thread per decode task"); raise it with decode_num_cpus, e.g. for few long HD files on many cores.
    codec_threads: int = Field(1, ge=0, le=64)
    # files per decode task: Ray Data schedules one task per block of files, and each task has a fixed cost;
    # 4 per task made a warm 96-file run on 2 cores 1.12x faster than 1 (docs/decisions.md). The file list is
    # still cut into at least two tasks per decode slot, so small jobs use every slot.
    decode_files_per_task: int = Field(4, ge=1, le=4096)

    @model_validator(mode="after")
    def _check(self):
        if self.hr_size is not None and self.hr_size < self.size:
            raise ValueError(f"hr_size ({self.hr_size}) must be >= size ({self.size}) or null")
        return self

    def decode_task_memory(self) -> int:
        """Bytes Ray reserves per decode task: the worker's own footprint (torch, decord, x264: ~0.8 GB
        measured) plus the frames it holds: decoded chunks (up to 4 of 64 frames at the decode size, 16:9 at
        the short side), what decord decodes ahead, and one clip at both resolutions, plus one output block of
        candidates."""
        if self.decode_memory_mb is not None:
            return self.decode_memory_mb * 2**20
        short = max(self.size, self.hr_size or 0)
        frame = short * (short * 16 // 9) * 3
        # + the frames the shot detector has not decided yet (TransNetV2: up to 75 behind, and one chunk)
        held = 4 * 64 + (139 if self.shot_detector == "transnetv2" else 0)
        frames = held * frame + self.clip_frames * (frame + 3 * self.size**2 + 3 * (self.hr_size or 0) ** 2)
        # + what decord may decode ahead of a slow consumer (at most decode_ahead_max_bytes: longer files go to PyAV)
        # + TransNetV2: its weights and activations (~0.3 GB measured) and what it leaves in the worker (a Ray worker
        # with it peaked at 2.07 GB over 96 short files, against 1.77 GB with the histogram: benchmarks/RESULTS.md
        # "Ingestion with TransNetV2"), with a margin
        model = 1024 * 2**20 if self.shot_detector == "transnetv2" else 0
        return int(800 * 2**20 + 2 * frames + 128 * 2**20 + self.decode_ahead_max_bytes + model)

    def reads_by_ranges(self, ranges: int) -> bool:
        """Whether a decode task reads a remote file of `ranges` time ranges in place by byte ranges (else from a
        local copy): `remote_decode`."""
        return self.remote_decode == "ranges" or (self.remote_decode == "auto" and ranges > 1)

    def text_encoder(self) -> TextEncoderConfig:
        if self.text is not None:
            return self.text
        if self.encoder_from is None:
            return TextEncoderConfig()
        from lumiere.config import load_config  # lazily: lumiere.config imports the models (diffusers, scipy)

        return load_config(self.encoder_from).text


def load_ingest_config(path: str | Path | None = None, overrides: list[str] | None = None) -> IngestConfig:
    # lazily: lumiere.config imports the models (diffusers, scipy), which Ray's decode and write workers,
    # unpickling an IngestConfig, must not pay for
    from lumiere.config import _format_error, _set_path, parse_override, read_yaml_mapping

    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config error: ingest config {path} does not exist")
        data = read_yaml_mapping(path)
    for text in overrides or []:
        _set_path(data, *parse_override(text))
    try:
        return IngestConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None
