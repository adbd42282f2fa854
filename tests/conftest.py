"""Shared fixtures. Model tests use the `tiny` config (a few channels, 8 frames, 32×32) on CPU."""

import contextlib
import os
import subprocess
import sys
import time

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@contextlib.contextmanager
def local_s3():
    """A real S3 API on 127.0.0.1 (moto's server) for one test: yields (boto3 client, StorageOptions for it)."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    from lumiere.storage import StorageOptions

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                              region_name="us-east-1")
        yield client, StorageOptions(endpoint_override=endpoint, region="us-east-1", access_key="test",
                                     secret_key="test")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_cfg():
    from lumiere.config import load_config

    return load_config("tiny")


def perturb_(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised outputs become non-trivial (a 'trained' model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def run_cli(*args: str, timeout: float = 300, env: dict | None = None,
            retries_until_up: int = 0) -> subprocess.CompletedProcess:
    """Run the `lumiere` CLI in a subprocess (as a user would), capturing output. With retries_until_up, a run
    that fails because a server it talks to is not up yet ("cannot reach") is retried once a second."""
    for _ in range(retries_until_up + 1):
        proc = subprocess.run(
            [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=timeout, env=env
        )
        if "cannot reach" not in proc.stderr:
            break
        time.sleep(1)
    return proc


def run_clis(*arg_lists: list[str], parallel: int = 4, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """run_cli for each argument list, `parallel` at a time, in order of the lists: a CLI process spends most of
    its few seconds importing (torch, ray) on one core, so independent runs overlap well."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda args: run_cli(*args, timeout=timeout), arg_lists))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole suite; 4 logical CPUs on 2 cores (see DEVELOPERS: 2 deadlocks). address="local":
    always a new instance, never a head someone started on this machine (ray.init() would join that one)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (tests/pg.py). Under CI=true a missing server is a failure."""
    from pg import PostgresServer

    try:
        server = PostgresServer()
        server.start()
    except RuntimeError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL tests need a server: {e}")
    yield server
    server.cleanup()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty job-store database: a SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    server = request.getfixturevalue("postgres_server")
    return server.create_database(f"t_{os.urandom(6).hex()}")


@contextlib.contextmanager
def mlflow_tracking_env(directory):
    """MLFLOW_TRACKING_URI set to a fresh SQLite store in `directory` for the block, restored after."""
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def ingest_shapes(root, count: int, seed: int, overrides: list[str]):
    """`count` 88-frame 128×128 moving-shapes videos ingested into standard shards at root/shards (the tiny
    config's text encoder, plus `overrides`); returns the shards directory."""
    from lumiere.shapes import make_corpus
    from pipelines.ingest.config import load_ingest_config
    from pipelines.ingest.job import run_ingest

    make_corpus(root / "corpus", count, frames=88, size=128, seed=seed)
    # single-shot synthetic clips, all of them wanted (as the demo ingests them): the histogram detector, no
    # near-duplicate filter; the ingestion tests cover TransNetV2 and near_dedup
    defaults = ["encoder_from=tiny", "shot_detector=histogram", "near_dedup=none"]
    run_ingest(str(root / "corpus"), str(root / "shards"), str(root / "corpus" / "captions.jsonl"),
               load_ingest_config(None, [*defaults, *overrides]), log=lambda *a: None)
    return root / "shards"
