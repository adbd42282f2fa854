"""Reading parts of an ingest output: the resume scan, finalize, the near-dedup actor and the contact sheets fetch
only the columns they need (ranged reads), never the frames, counted in bytes read through the filesystem."""

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from lumiere import storage
from pipelines.ingest import job


class CountingReader(io.RawIOBase):
    """A local file that adds every byte read to a shared counter."""

    def __init__(self, path: str, counter: list[int]):
        self.f, self.counter = open(path, "rb"), counter  # noqa: SIM115 (closed by close())

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer):
        n = self.f.readinto(buffer)
        self.counter[0] += n
        return n

    def seek(self, offset, whence=0):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    def close(self):
        self.f.close()
        super().close()


class CountingHandler(pafs.FSSpecHandler):
    def __init__(self, counter):
        import fsspec

        super().__init__(fsspec.filesystem("file"))
        self.counter = counter

    def open_input_file(self, path):
        return pa.PythonFile(CountingReader(path, self.counter), mode="r")

    def open_input_stream(self, path):
        return self.open_input_file(path)


@pytest.fixture
def bytes_read(monkeypatch):
    """The local filesystem behind `lumiere.storage`, counting the bytes every reader takes from it."""
    counter = [0]
    fs = pafs.PyFileSystem(CountingHandler(counter))
    local = storage.resolve

    def resolve(uri, options=None):
        return fs, local(uri, options)[1]

    monkeypatch.setattr(storage, "resolve", resolve)
    return counter


def write_part(path, clips: int = 4, frame_bytes: int = 2_000_000) -> int:
    """A shard part like ingestion's: a few small state columns and incompressible frames. Returns its size."""
    rng = np.random.default_rng(0)
    table = pa.table({
        "clip_id": [f"file-{i}" for i in range(clips - 1)] + ["file-done"],
        "source": ["/videos/file.mp4"] * clips,
        "file_candidates": [clips] * clips,
        "thumb": [b"png"] * clips,
        "frames": [rng.bytes(frame_bytes) for _ in range(clips)],
    })
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)
    return os.path.getsize(path)


def test_the_resume_scan_reads_the_state_columns_not_the_frames(tmp_path, bytes_read):
    size = write_part(str(tmp_path / "out" / "shards" / "part-0.parquet"))
    state = job.scan_committed(str(tmp_path / "out"), storage.StorageOptions())
    # the state is right: four committed ids, the done record counting them
    assert state["/videos/file.mp4"]["ids"] == {"file-0", "file-1", "file-2", "file-done"}
    assert state["/videos/file.mp4"]["done"] == {"file-done": 4}
    assert job.is_done(state["/videos/file.mp4"])
    # and it took a small share of the 8 MB part (the footer and three small columns)
    assert 0 < bytes_read[0] < 0.02 * size, (bytes_read[0], size)


def test_the_counter_sees_a_whole_part_read(tmp_path, bytes_read):
    # the control: reading the part's bytes whole (what the scan did before) takes all of it through the counter
    path = str(tmp_path / "part.parquet")
    size = write_part(path)
    assert len(storage.read_bytes(path)) == size
    assert bytes_read[0] >= size


def test_read_parquet_columns_skips_columns_an_older_part_lacks(tmp_path, bytes_read):
    path = str(tmp_path / "part.parquet")
    size = write_part(path)
    table = storage.read_parquet_columns(path, ["clip_id", "thumb", "image_embedding"])
    assert table.column_names == ["clip_id", "thumb"]
    assert table["thumb"].to_pylist() == [b"png"] * 4
    assert bytes_read[0] < 0.02 * size


def test_the_progress_line_counts_files_and_gives_an_eta_only_while_files_remain():
    from collections import Counter

    written = Counter({"done_rows": 3, "shard_rows": 24, "rejects_rows": 2})
    line = job._progress_line(written, 12, 30.0)
    # 3 of 12 files in 30 s: 9 to go at 10 s each
    assert line == "[ingest] files 3/12 (25%), 24 clips, 2 rejects, 0.80 clips/s, 30s, ETA 90s", line
    assert "ETA" not in job._progress_line(Counter(), 12, 5.0)  # no file done yet: no rate to go by
    done = job._progress_line(Counter({"done_rows": 12, "shard_rows": 96}), 12, 60.0, "file ranges")
    assert done.startswith("[ingest] file ranges 12/12 (100%), 96 clips") and "ETA" not in done, done
