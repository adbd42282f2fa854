"""The node-local copy of remote input files that the time ranges of a long file share (pipelines/ingest/
source_cache.py), against moto's S3 server: one download for concurrent tasks in separate processes, a killed
download's leftovers, eviction by recency that never deletes a file in use, and the private copy otherwise."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os

import pytest

from lumiere.storage import StorageOptions
from pipelines.ingest.source_cache import local_source

SIZE = 3 * 2**20 + 17  # more than one 8 MB block would be a slower test; a block boundary is not what is tested


@pytest.fixture(scope="module")
def s3():
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
    client.create_bucket(Bucket="films")
    blobs = {}
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        blobs[name] = os.urandom(SIZE)
        client.put_object(Bucket="films", Key=name, Body=blobs[name])
    options = StorageOptions(endpoint_override=endpoint, region="us-east-1", access_key="test", secret_key="test")
    yield options, blobs
    server.stop()


def _data_files(cache):
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def _fetch_in_child(options, cache, barrier, out):
    barrier.wait()  # every process asks at the same moment
    with local_source("s3://films/a.mp4", options, True, str(cache), 10 * SIZE) as (path, fetched):
        with open(path, "rb") as f:
            out.put((fetched, hashlib.sha256(f.read()).hexdigest()))


def test_concurrent_ranges_of_one_file_download_it_once(s3, tmp_path):
    options, blobs = s3
    ctx = mp.get_context("fork")  # separate processes, as Ray's decode tasks are
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_fetch_in_child, args=(options, tmp_path, barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sorted(f for f, _ in results) == [0, 0, 0, SIZE]  # one task downloaded, three used its copy
    assert {h for _, h in results} == {hashlib.sha256(blobs["a.mp4"]).hexdigest()}
    assert len(_data_files(tmp_path)) == 1


def test_a_killed_downloads_leftovers_are_replaced(s3, tmp_path):
    options, blobs = s3
    with local_source("s3://films/b.mp4", options, True, str(tmp_path), 10 * SIZE) as (path, fetched):
        assert fetched == SIZE
    # a task killed mid-download leaves its .part behind; a short copy stands for a copy that is not whole
    with open(path, "r+b") as f:
        f.truncate(SIZE // 2)
    with open(path + ".part-dead0000", "wb") as f:
        f.write(b"x" * 1000)
    with local_source("s3://films/b.mp4", options, True, str(tmp_path), 10 * SIZE) as (again, fetched):
        assert again == path and fetched == SIZE  # the short copy is not trusted: fetched again
        with open(again, "rb") as f:
            assert f.read() == blobs["b.mp4"]
    assert _data_files(tmp_path) == [os.path.basename(path)]  # the stale part is gone


def test_least_recently_used_copies_go_first_but_never_one_in_use(s3, tmp_path):
    options, _ = s3
    bound = int(2.5 * SIZE)  # room for two copies
    for name in ("a.mp4", "b.mp4"):
        with local_source(f"s3://films/{name}", options, True, str(tmp_path), bound) as (_, fetched):
            assert fetched == SIZE
    with local_source("s3://films/a.mp4", options, True, str(tmp_path), bound) as (a_path, fetched):
        assert fetched == 0  # a is now the most recently used
    with local_source("s3://films/c.mp4", options, True, str(tmp_path), bound) as (_, fetched):
        assert fetched == SIZE
    files = _data_files(tmp_path)
    assert len(files) == 2 and os.path.basename(a_path) in files  # b, the least recently used, went
    # a copy in use is not deleted even when the bound needs the room: the bound is exceeded instead
    with local_source("s3://films/a.mp4", options, True, str(tmp_path), SIZE + 1) as (held, _):
        with local_source("s3://films/b.mp4", options, True, str(tmp_path), SIZE + 1) as (_, fetched):
            assert fetched == SIZE and os.path.exists(held)
    assert len(_data_files(tmp_path)) == 2  # c (unused) was evicted for b, a was held


def test_a_single_task_or_an_oversized_file_gets_a_private_copy(s3, tmp_path):
    options, blobs = s3
    for shared, bound in ((False, 10 * SIZE), (True, SIZE - 1), (True, 0)):
        with local_source("s3://films/c.mp4", options, shared, str(tmp_path / "cache"), bound) as (path, fetched):
            assert fetched == SIZE and not path.startswith(str(tmp_path))
            with open(path, "rb") as f:
                assert f.read() == blobs["c.mp4"]
        assert not os.path.exists(path)  # deleted with its task
        assert not (tmp_path / "cache").exists() or _data_files(tmp_path / "cache") == []
    local = tmp_path / "local.mp4"
    local.write_bytes(b"abc")
    with local_source(str(local), options, True, str(tmp_path / "cache"), 10) as (path, fetched):
        assert path == str(local) and fetched == 0
    with pytest.raises(FileNotFoundError, match="missing.mp4 does not exist"):
        with local_source("s3://films/missing.mp4", options, True, str(tmp_path), 10 * SIZE):
            pass
