"""The Serve job store (SQLAlchemy; SQLite here) and artifact store (local dir and S3 via moto's server); the app's
args from the environment (how the RayService, whose serveConfigV2 is serve/config.yaml, names its model)."""

from __future__ import annotations

import inspect
import os
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
    time.sleep(2.1)  # heartbeats are whole seconds (int(time.time())): 1.1 s left it live about half the time
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


# --- serve/config.yaml + the environment -> the app (built, not deployed: no Ray) ------------------------------
@pytest.fixture
def clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith("LUMIERE_"):
            monkeypatch.delenv(var)
    return monkeypatch


def _parts(app):
    """(encoder, generator, upsampler, settings) bound to the Ingress of a built app (Serve's Application)."""
    encoder, generator, upsampler, settings = app._bound_deployment.init_args
    return encoder._bound_deployment, generator._bound_deployment, upsampler and upsampler._bound_deployment, settings


def test_the_serve_config_takes_model_device_and_stores_from_the_environment(tmp_path, clean_env):
    from lumiere import cli
    from serve.app import build_app
    from serve.launch import LOCAL_HOST, read_serve_config

    config = read_serve_config(None)
    entry = config["applications"][0]
    # the file names no model or device (the env's would lose to it) and listens on the pod's interfaces ...
    named = {"checkpoint", "model_uri", "random_init", "ssr_checkpoint", "ssr_model_uri", "device"}
    assert not named & set(entry["args"])
    assert config["http_options"]["host"] == "0.0.0.0"
    # ... while `lumiere serve` binds 127.0.0.1 unless --host says otherwise
    assert LOCAL_HOST == "127.0.0.1" and inspect.signature(cli.serve).parameters["host"].default.default == LOCAL_HOST
    # Serve replaces an app's ray_actor_options whole with the YAML's: none for the GPU deployments
    assert all("ray_actor_options" not in d for d in entry["deployments"] if d["name"] in ("Generator", "Upsampler"))

    for var, value in {"LUMIERE_MODEL_URI": "models:/lumiere-stunet@latest", "LUMIERE_SSR_CHECKPOINT": "/ckpt/ssr",
                       "LUMIERE_DEVICE": "cuda", "LUMIERE_API_KEYS": "k1,k2",
                       "LUMIERE_DB_URL": sqlite_url(tmp_path / "jobs.db"), "LUMIERE_ARTIFACTS": "s3://b/serve"}.items():
        clean_env.setenv(var, value)
    encoder, generator, upsampler, settings = _parts(build_app(entry["args"]))  # what Serve calls with the YAML
    assert generator.init_args[0]["model_uri"] == "models:/lumiere-stunet@latest"
    assert generator.init_args[0]["checkpoint"] is None and generator.init_args[0]["device"] == "cuda"
    assert upsampler.init_args[0]["checkpoint"] == "/ckpt/ssr"
    assert generator.ray_actor_options == upsampler.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 1}
    assert "num_gpus" not in encoder.ray_actor_options
    assert settings["api_keys"] == ("k1", "k2") and settings["artifacts"] == "s3://b/serve"
    assert settings["db_url"] == sqlite_url(tmp_path / "jobs.db") and settings["model_name"] == "lumiere-stunet"

    # args (the YAML's, a lumiere serve flag) win over the environment; a fractional GPU; cpu: no GPUs
    clean_env.setenv("LUMIERE_NUM_GPUS", "0.5")
    _, generator, upsampler, _ = _parts(build_app({"checkpoint": "/ckpt/stunet", "ssr_random_init": "tiny"}))
    assert generator.init_args[0]["checkpoint"] == "/ckpt/stunet" and generator.init_args[0]["model_uri"] is None
    assert upsampler.init_args[0]["random_init"] == "tiny" and upsampler.init_args[0]["checkpoint"] is None
    assert generator.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.5}
    _, generator, _, _ = _parts(build_app({"device": "cpu"}))
    assert generator.init_args[0]["device"] == "cpu" and "num_gpus" not in generator.ray_actor_options


def test_the_environment_is_checked(clean_env):
    from lumiere.errors import LumiereError
    from serve.app import args_with_env, build_app

    clean_env.setenv("LUMIERE_API_KEYS", "k")
    with pytest.raises(LumiereError, match="no model.*LUMIERE_MODEL_URI"):
        build_app({})
    assert args_with_env({}) == {"device": "cpu"}
    env = {"LUMIERE_MODEL_URI": "models:/m@latest", "LUMIERE_CHECKPOINT": "/ckpt"}
    with pytest.raises(LumiereError, match="LUMIERE_CHECKPOINT or LUMIERE_MODEL_URI, not both"):
        args_with_env({}, env)
    assert args_with_env({"random_init": "tiny"}, env) == {"random_init": "tiny", "device": "cpu"}
    with pytest.raises(LumiereError, match="LUMIERE_DEVICE"):
        args_with_env({}, {"LUMIERE_DEVICE": "gpu"})
    with pytest.raises(LumiereError, match="LUMIERE_NUM_GPUS"):
        args_with_env({}, {"LUMIERE_DEVICE": "cuda", "LUMIERE_NUM_GPUS": "0"})
    assert args_with_env({}, {"LUMIERE_DEVICE": " cuda "})["num_gpus"] == 1
