"""The Serve job store (SQLAlchemy; SQLite here) and artifact store (local dir and S3 via moto's server)."""

from __future__ import annotations

import time

import pytest

from serve.artifacts import ArtifactStore
from serve.jobs import JobStore, sqlite_url


def _job(store: JobStore, owner: str, prompt: str = "p"):
    return store.create(model="m", prompt=prompt, seconds="0.5", size="32x32", task="t2v", params={"seed": 1},
                        owner=owner)


def test_job_lifecycle_list_and_interrupted_jobs(tmp_path):
    store = JobStore(sqlite_url(tmp_path / "jobs.db"))
    store.heartbeat("a")
    jobs = [_job(store, "a", f"p{i}") for i in range(3)]
    store.set_progress(jobs[0].id, 40)
    assert store.get(jobs[0].id).status == "in_progress" and store.get(jobs[0].id).progress == 40
    store.complete(jobs[0].id, {"seed": 1, "notes": ["n"]})
    done = store.get(jobs[0].id)
    assert done.status == "completed" and done.progress == 100 and done.to_openai()["notes"] == ["n"]
    store.fail(jobs[1].id, "invalid_request", "bad mask")
    assert store.get(jobs[1].id).to_openai()["error"] == {"code": "invalid_request", "message": "bad mask"}
    page, more = store.list(limit=2)
    assert [j.id for j in page] == [jobs[2].id, jobs[1].id] and more
    page, more = store.list(after=jobs[1].id, limit=2)
    assert [j.id for j in page] == [jobs[0].id] and not more
    assert [j.id for j in store.list(order="asc")[0]] == [j.id for j in jobs]
    # the owner is alive: its queued job is left alone; once it stops beating, the job fails with the reason
    assert store.fail_interrupted("restarted", stale_after_s=60) == 0
    assert store.count_active() == 1
    reopened = JobStore(sqlite_url(tmp_path / "jobs.db"))  # a restart: same database
    time.sleep(1.1)
    assert reopened.fail_interrupted("restarted", stale_after_s=0.5, alive="b") == 1
    failed = reopened.get(jobs[2].id)
    assert failed.status == "failed" and failed.error == {"code": "interrupted", "message": "restarted"}
    assert reopened.get(jobs[0].id).status == "completed"
    assert reopened.delete(jobs[0].id) and reopened.get(jobs[0].id) is None and not reopened.delete(jobs[0].id)


def test_artifacts_local(tmp_path):
    store = ArtifactStore(str(tmp_path / "art"))
    store.put("video_1", "video.mp4", b"abc")
    assert store.get("video_1", "video.mp4") == b"abc" and store.get("video_1", "nope.png") is None
    store.delete_job("video_1")
    assert store.get("video_1", "video.mp4") is None and not (tmp_path / "art" / "video_1").exists()
    store.delete_job("video_never")  # nothing to delete is fine


def test_artifacts_s3():
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    from lumiere.storage import StorageOptions

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
        s3.create_bucket(Bucket="videos")
        options = StorageOptions(endpoint_override=endpoint, region="us-east-1", access_key="test", secret_key="test")
        store = ArtifactStore("s3://videos/serve", options)
        store.put("video_1", "video.mp4", b"mp4 bytes")
        store.put("video_1", "thumbnail.png", b"png")
        assert s3.get_object(Bucket="videos", Key="serve/video_1/video.mp4")["Body"].read() == b"mp4 bytes"
        assert store.get("video_1", "thumbnail.png") == b"png"
        store.delete_job("video_1")
        assert store.get("video_1", "video.mp4") is None
        assert "Contents" not in s3.list_objects_v2(Bucket="videos", Prefix="serve/video_1/")
    finally:
        server.stop()
