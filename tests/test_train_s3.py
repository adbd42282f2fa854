"""`lumiere train --output s3://…` against a local S3 server (moto's, as the ingest tests use): Ray Train's
checkpoints go to the bucket from the workers, the final checkpoint is published as an immutable version with a
`checkpoints/latest` pointer, a re-run with the same run name resumes from the bucket, and a STUNet starts from
`--init-from s3://…/checkpoints/latest`. The Ray workers are started before the S3 settings are put in this
process's environment, so they only reach the bucket with the settings the driver hands them."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load as load_safetensors

from conftest import ingest_shapes, mlflow_tracking_env, run_cli

pytestmark = pytest.mark.timeout(600)
BUCKET = "lumiere-ckpt"
TINY = ["train.checkpoint_every=4", "train.log_every=2", "train.batch_size=2"]


def _cfg(*extra):
    from lumiere.config import load_config

    return load_config("tiny", [*TINY, *extra])


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_session):
    """Standard 80-frame shards of moving shapes, embedded with the tiny config's text encoder (local: only the
    training output is on S3 here; S3 input is the ingest tests' subject)."""
    return ingest_shapes(tmp_path_factory.mktemp("train-s3-data"), 4, seed=5,
                         overrides=["hr_size=null", "shard_clips=2"])


@pytest.fixture(scope="module")
def s3(ray_session):
    """A moto S3 server with an empty bucket, and its address and credentials in this process's environment
    (where StorageOptions.from_env reads them on the driver) for the module's tests."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    with mlflow_tracking_env(tmp_path_factory.mktemp("mlflow-s3")) as uri:
        yield uri


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory: an s3:// --output must not create anything locally (e.g. an `s3:` folder)."""
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def _keys(s3, prefix: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _pointer(s3, run: str) -> dict:
    return json.loads(_object(s3, f"{run}/checkpoints/latest"))


def _train_t2i(shards, max_steps: int):
    from pipelines.train.job import run_training

    return run_training("t2i", str(shards), f"s3://{BUCKET}/runs/t2i/", _cfg(f"train.max_steps={max_steps}"),
                        num_workers=2, run_name="t2i-s3", sample_every=0, log=lambda *a: None)


def _object(s3, uri: str) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=uri.split("/", 3)[3] if uri.startswith("s3://") else uri)["Body"].read()


def _local_leftovers(workdir) -> set[str]:
    return set(os.listdir(workdir)) - {"mlruns"}  # MLflow's default artifact root for a new experiment


def test_t2i_checkpoints_go_to_s3_and_a_rerun_resumes_from_there(shards, s3, mlflow_uri, workdir):
    import mlflow

    first = _train_t2i(shards, 4)
    assert first["step"] == 4
    keys = _keys(s3, "runs/t2i/")
    # Ray Train's run state and checkpoints, written by the controller and the workers
    assert any(k.startswith("runs/t2i/ray/t2i-s3/checkpoint_") and k.endswith("/meta.json") for k in keys), keys
    # the published checkpoint: an immutable version directory, and `latest` a pointer naming it
    pointer = _pointer(s3, "runs/t2i")
    version = f"runs/t2i/checkpoints/{pointer['checkpoint']}"
    assert pointer["step"] == 4 and pointer["kind"] == "t2i" and pointer["checkpoint"].startswith("t2i-s3-step0000004-")
    assert {f"{version}/{f}" for f in ("meta.json", "config.yaml", "model.safetensors", "ema.safetensors",
                                       "train_state.pt")} <= keys
    assert first["checkpoint"] == f"s3://{BUCKET}/{version}"
    meta = json.loads(_object(s3, f"{version}/meta.json"))
    assert meta["step"] == 4
    assert not _local_leftovers(workdir), os.listdir(workdir)
    # registered in MLflow with the checkpoint's files (uploaded from a local copy)
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    mv = client.get_model_version_by_alias("lumiere-t2i", "candidate")
    path = mv.source.split("/artifacts/", 1)[1]
    logged = {os.path.basename(a.path) for a in client.list_artifacts(first["run_id"], path)}
    assert {"meta.json", "model.safetensors", "ema.safetensors"} <= logged, logged

    # the same run name again with more steps: Ray Train finds the run's state in the bucket and resumes at step 4
    second = _train_t2i(shards, 8)
    assert second["step"] == 8 and second["run_id"] == first["run_id"]
    steps = [m.step for m in client.get_metric_history(first["run_id"], "loss")]
    assert steps == [2, 4, 6, 8], steps  # steps 2 and 4 were not trained (nor logged) again
    after = _pointer(s3, "runs/t2i")
    assert after["step"] == 8 and after["checkpoint"] != pointer["checkpoint"]
    assert f"{version}/model.safetensors" in _keys(s3, version)  # the previous version is left untouched
    assert not _local_leftovers(workdir), os.listdir(workdir)


def test_stunet_from_an_s3_latest_checkpoint(shards, s3, mlflow_uri, workdir, tmp_path):
    from lumiere.model_uri import resolve_model, s3_checkpoint
    from pipelines.train.job import run_training

    if "runs/t2i/checkpoints/latest" not in _keys(s3, "runs/t2i/checkpoints/"):
        _train_t2i(shards, 4)
    t2i = f"s3://{BUCKET}/runs/t2i"
    version = s3_checkpoint(f"{t2i}/checkpoints/latest")
    assert s3_checkpoint(t2i) == version  # a run's output prefix means its latest checkpoint
    assert version == f"{t2i}/checkpoints/{_pointer(s3, 'runs/t2i')['checkpoint']}"
    local = resolve_model(t2i, tmp_path / "fetched")  # outside training (e.g. serving): a local copy
    assert {"meta.json", "model.safetensors"} <= set(os.listdir(local))

    # the next stage on S3 too; the workers (whose environment has no S3 settings) fetch the init checkpoint
    # with the settings the driver hands them
    result = run_training("stunet", str(shards), f"s3://{BUCKET}/runs/stunet", _cfg("train.max_steps=2"),
                          init_from=f"{t2i}/checkpoints/latest", num_workers=1, run_name="stunet-s3",
                          sample_every=0, log=lambda *a: None)
    assert result["step"] == 2 and _pointer(s3, "runs/stunet")["kind"] == "stunet"
    prior = load_safetensors(_object(s3, f"{version}/ema.safetensors"))
    trained = load_safetensors(_object(s3, f"{result['checkpoint']}/model.safetensors"))
    for name, weight in prior.items():
        assert torch.equal(trained[f"prior.{name}"], weight), f"prior weight {name} changed"
    assert not _local_leftovers(workdir), os.listdir(workdir)


def test_a_local_init_checkpoint_is_staged_on_s3_for_an_s3_output(shards, s3, tmp_path, tiny_cfg):
    """With an s3:// --output the workers share no volume with the driver: a local (or models:/) --init-from is
    uploaded under OUTPUT/init/RUN_NAME/ and the workers fetch it from there."""
    from lumiere.checkpoint import build_prior, save_checkpoint
    from lumiere.storage import StorageOptions
    from pipelines.train.job import _init_for_workers

    local = save_checkpoint(tmp_path / "t2i", build_prior(tiny_cfg), tiny_cfg, "t2i", step=3)
    staged = _init_for_workers("stunet", str(local), tiny_cfg, f"s3://{BUCKET}/runs/staged", None, "r1",
                               StorageOptions.from_env())
    assert staged == f"s3://{BUCKET}/runs/staged/init/r1"
    assert {"meta.json", "model.safetensors"} <= {k.rsplit("/", 1)[1] for k in _keys(s3, "runs/staged/init/r1/")}


def test_s3_output_errors_are_one_line_before_training(shards, s3, mlflow_uri):
    from lumiere.errors import LumiereError
    from pipelines.train.job import run_training

    with pytest.raises(LumiereError, match="bucket 'no-such-bucket' does not exist"):
        run_training("t2i", str(shards), "s3://no-such-bucket/run", _cfg(), log=lambda *a: None)
    with pytest.raises(LumiereError, match="no checkpoint there"):
        run_training("stunet", str(shards), f"s3://{BUCKET}/runs/x", _cfg(), init_from=f"s3://{BUCKET}/nothing",
                     log=lambda *a: None)
    # the CLI hands --output over as given (a Path would have made it `s3:/…`, a local directory)
    proc = run_cli("train", "t2i", "--data", str(shards), "--output", "s3://no-such-bucket/run", "--config", "tiny",
                   timeout=120)
    assert proc.returncode == 2 and "bucket 'no-such-bucket' does not exist" in proc.stderr, proc.stderr
