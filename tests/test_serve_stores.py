"""The Serve job store (SQLAlchemy, Alembic migrations) against SQLite and a real PostgreSQL server the tests start
(tests/pg.py), and the artifact store (local dir and S3 via moto's server); the app's args from the environment (how
the RayService, whose serveConfigV2 is serve/config.yaml, names its model)."""

from __future__ import annotations

import inspect
import os
import time

import pytest

from conftest import local_s3
from serve.artifacts import ArtifactStore
from serve.jobs import JobStore, StoreError, jobs_table, sqlite_url


def _job(store: JobStore, tenant: str = "t", prompt: str = "p", **kw):
    job, created = store.create(model="m", prompt=prompt, seconds="0.5", size="32x32", task="t2v",
                                params={"seed": 1}, tenant=tenant, **kw)
    assert created
    return job


def test_job_lifecycle_claim_progress_complete_and_list(db_url):
    store = JobStore(db_url)
    jobs = [_job(store, prompt=f"p{i}") for i in range(3)]
    claimed = store.claim("a")  # the oldest queued job
    assert claimed.id == jobs[0].id and claimed.status == "in_progress" and claimed.owner == "a"
    assert claimed.attempts == 1 and claimed.started_at is not None
    assert store.set_progress(jobs[0].id, 40, "a") and store.get(jobs[0].id).progress == 40
    assert not store.set_progress(jobs[0].id, 50, "b")  # another replica does not hold it
    assert store.complete(jobs[0].id, {"seed": 1, "notes": ["n"]}, "a")
    done = store.get(jobs[0].id)
    assert done.status == "completed" and done.progress == 100 and done.to_openai()["notes"] == ["n"]
    assert store.claim("b").id == jobs[1].id
    assert store.fail(jobs[1].id, "invalid_request", "bad mask", "b")
    assert store.get(jobs[1].id).to_openai()["error"] == {"code": "invalid_request", "message": "bad mask"}
    # a job that ended cannot change again: a late `complete` from its old runner is refused
    assert not store.complete(jobs[1].id, {}, "b") and store.get(jobs[1].id).status == "failed"
    page, more = store.list(limit=2)
    assert [j.id for j in page] == [jobs[2].id, jobs[1].id] and more
    page, more = store.list(after=jobs[1].id, limit=2)
    assert [j.id for j in page] == [jobs[0].id] and not more
    assert [j.id for j in store.list(order="asc")[0]] == [j.id for j in jobs]
    assert store.count_active() == 1
    assert store.delete(jobs[0].id) and store.get(jobs[0].id) is None and not store.delete(jobs[0].id)


def test_a_dead_replicas_job_is_requeued_once_then_failed_and_a_long_job_times_out(db_url):
    store = JobStore(db_url)
    job = _job(store)
    store.heartbeat("a")
    assert store.claim("a").id == job.id
    counts = store.sweep(reason="restarted", stale_after_s=60, max_attempts=2)
    assert counts == {"requeued": 0, "interrupted": 0, "timed_out": 0, "ended": []}  # its owner is alive
    time.sleep(2.1)  # heartbeats are whole seconds (int(time.time())): 1.1 s left it live about half the time
    assert store.sweep(reason="restarted", stale_after_s=0.5, max_attempts=2, alive="b")["requeued"] == 1
    again = store.get(job.id)
    assert again.status == "queued" and again.owner is None and again.attempts == 1
    assert not store.set_progress(job.id, 10, "a")  # the dead owner's late report does not take it back
    store.heartbeat("b")
    assert store.claim("b").attempts == 2
    time.sleep(2.1)  # b dies too: its attempts are used up
    counts = store.sweep(reason="restarted", stale_after_s=0.5, max_attempts=2, alive="c")
    assert counts["interrupted"] == 1 and counts["ended"] == [job.id]  # the sweeper is told, to send its webhook
    assert store.sweep(reason="restarted", stale_after_s=0.5, max_attempts=2, alive="d")["ended"] == []  # once
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.error == {"code": "interrupted", "message": "restarted"}
    # the job timeout counts from the claim, whoever holds the job
    slow = _job(store, prompt="slow")
    store.heartbeat("c")
    store.claim("c")
    time.sleep(1.1)
    counts = store.sweep(reason="x", stale_after_s=60, timeout_s=0.5)
    assert counts["timed_out"] == 1 and counts["ended"] == [slow.id]
    assert store.get(slow.id).error["code"] == "timeout" and not store.complete(slow.id, {}, "c")
    # a replica that shuts down cleanly hands its running job back at once
    third = _job(store, prompt="handed back")
    store.claim("c")
    assert store.release("c") == 1 and store.get(third.id).status == "queued"


def test_tenants_see_only_their_own_jobs(db_url):
    store = JobStore(db_url)
    mine = [_job(store, "acme", f"a{i}") for i in range(3)]
    theirs = _job(store, "globex", "g")
    assert store.get(theirs.id, "acme") is None and store.get(theirs.id, "globex").id == theirs.id
    assert [j.id for j in store.list(tenant="acme", order="asc")[0]] == [j.id for j in mine]
    assert store.list(tenant="acme", after=theirs.id)[0] == store.list(tenant="acme")[0]  # not an anchor for acme
    assert not store.delete(theirs.id, "acme") and store.get(theirs.id) is not None
    assert store.cancel(theirs.id, "acme") is None and store.get(theirs.id).status == "queued"
    assert store.count_active("acme") == 3 and store.count_active("globex") == 1
    cancelled = store.cancel(mine[0].id, "acme")
    assert cancelled.status == "failed" and cancelled.error["code"] == "cancelled"
    assert store.claim("r").id == mine[1].id  # a cancelled job is never claimed
    # whether it was still queued decides who sends its webhook (the cancel request, or the runner holding it)
    job, was_queued = store.cancel_and_tell(mine[2].id, "acme")
    assert was_queued and job.error["code"] == "cancelled"
    job, was_queued = store.cancel_and_tell(mine[1].id, "acme")  # in progress on runner "r"
    assert not was_queued and job.status == "failed" and job.error["code"] == "cancelled"
    assert store.cancel_and_tell(mine[1].id, "acme") == (store.get(mine[1].id), False)  # already ended
    assert store.cancel_and_tell(theirs.id, "acme") == (None, False)


def test_active_job_limits_hold_under_concurrent_creates_and_idempotency_keys_dedupe(db_url):
    from concurrent.futures import ThreadPoolExecutor

    from serve.jobs import IdempotencyConflict, LimitReached

    store = JobStore(db_url)

    def attempt(i):
        try:
            return _job(store, "acme" if i % 2 else "globex", f"p{i}", max_active=7, max_active_per_tenant=4).id
        except LimitReached as e:
            return e.scope

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(24)))
    made = [r for r in results if r.startswith("video_")]
    assert len(made) == 7 and store.count_active() == 7  # never one over, though 8 threads raced
    assert store.count_active("acme") <= 4 and store.count_active("globex") <= 4
    assert results.count("tenant") + results.count("server") == 17
    # the same key and request: the same job, however many times and from however many threads
    def keyed(_):
        return store.create(model="m", prompt="k", seconds="1", size="32x32", task="t2v", params={}, tenant="initech",
                            idempotency_key="retry-1", request_hash="h1")
    with ThreadPoolExecutor(6) as pool:
        pairs = list(pool.map(keyed, range(6)))
    assert len({j.id for j, _ in pairs}) == 1 and [c for _, c in pairs].count(True) == 1
    with pytest.raises(IdempotencyConflict):  # the same key for a different request
        store.create(model="m", prompt="other", seconds="1", size="32x32", task="t2v", params={}, tenant="initech",
                     idempotency_key="retry-1", request_hash="h2")
    other, created = store.create(model="m", prompt="k", seconds="1", size="32x32", task="t2v", params={},
                                  tenant="hooli", idempotency_key="retry-1", request_hash="h1")
    assert created and other.id != pairs[0][0].id  # keys are per tenant


def test_claims_from_many_threads_run_each_job_once(db_url):
    from concurrent.futures import ThreadPoolExecutor

    store = JobStore(db_url)
    made = [_job(store, prompt=f"p{i}").id for i in range(24)]

    def drain(owner):
        got = []
        while (job := store.claim(owner)) is not None:
            got.append(job.id)
        return got

    with ThreadPoolExecutor(6) as pool:
        claimed = [i for got in pool.map(drain, [f"r{i}" for i in range(6)]) for i in got]
    assert sorted(claimed) == sorted(made)  # each exactly once (a duplicate claim would show here)
    assert all(claimed.count(i) == 1 for i in made)


def test_creation_order_key_is_64_bit_and_lists_in_order(db_url):
    """`seq` is time_ns (~1.8e18): a 32-bit INTEGER column made every create fail on PostgreSQL."""
    store = JobStore(db_url)
    assert store.revision == "0003"
    jobs = [_job(store, "a", f"p{i}") for i in range(5)]
    assert all(store.get(j.id).seq == j.seq > 2**31 for j in jobs)
    assert [j.id for j in store.list(order="asc", limit=10)[0]] == [j.id for j in jobs]


def test_concurrent_creates_from_many_threads_lose_and_duplicate_nothing(db_url):
    from concurrent.futures import ThreadPoolExecutor

    store = JobStore(db_url)
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda i: _job(store, f"o{i % 3}", f"p{i}").id, range(64)))
    listed = []
    after = None
    while True:  # page through everything, as a client would
        page, more = store.list(after=after, limit=10)
        listed += [j.id for j in page]
        if not more:
            break
        after = page[-1].id
    counts = {i: listed.count(i) for i in set(listed)}
    assert len(listed) == 64 and set(counts.values()) == {1} and set(listed) == set(made)
    assert store.count_active() == 64


def _open_store_revision(url: str) -> str:
    return JobStore(url).revision


def test_many_replicas_opening_a_new_store_at_once_migrate_it_once(db_url):
    """Separate processes (as replicas are) open an empty database at the same moment: each ends at head, none
    fails on a table another one is creating (PostgreSQL: the advisory lock; SQLite: its write lock)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:
        revisions = list(pool.map(_open_store_revision, [db_url] * 3))
    assert revisions == ["0003"] * 3
    _job(JobStore(db_url), "a")


def test_store_made_before_migrations_is_stamped_and_upgraded(db_url):
    """A database the old `create_all` made (32-bit seq, no alembic_version) is adopted: stamped at 0001 and
    upgraded, its rows kept."""
    from sqlalchemy import Column, Integer, MetaData, Table, create_engine, inspect, text

    engine = create_engine(db_url)
    old = MetaData()
    first = ["id", "seq", "created_at", "completed_at", "status", "progress", "model", "prompt", "seconds", "size",
             "task", "remixed_from_video_id", "params", "error", "owner"]  # the 0001 columns
    Table(jobs_table.name, old, *[Column(c.name, Integer if c.name == "seq" else c.type, primary_key=c.primary_key,
                                         nullable=c.nullable) for c in jobs_table.columns if c.name in first])
    Table("lumiere_ingress_owners", old, Column("owner", jobs_table.c.owner.type, primary_key=True),
          Column("seen_at", Integer, nullable=False))
    old.create_all(engine)
    with engine.begin() as c:
        c.execute(jobs_table.insert().values(id="video_old", seq=5, created_at=1, status="completed", progress=100,
                                             model="m", prompt="kept", seconds="1", size="32x32", task="t2v",
                                             params={}))
    assert not inspect(engine).has_table("alembic_version")
    engine.dispose()
    store = JobStore(db_url)
    assert store.revision == "0003" and store.get("video_old").prompt == "kept"
    assert store.get("video_old", "default").tenant == "default"  # jobs from before tenants: the default tenant
    big = _job(store, "a")
    assert store.get(big.id).seq > 2**31
    with store.engine.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0003"


def test_postgres_store_survives_a_server_crash_and_restart(postgres_server):
    """SIGKILL the PostgreSQL server with jobs in it, start it again: every committed job is there, and the same
    store object works again (pool_pre_ping replaces the dead connections)."""
    url = postgres_server.create_database(f"t_{os.urandom(6).hex()}")
    store = JobStore(url)
    jobs = [_job(store, "a", f"p{i}") for i in range(3)]
    store.claim("a")
    store.complete(jobs[0].id, {"seed": 1}, "a")
    postgres_server.kill()
    postgres_server.start()
    reopened = JobStore(url)
    assert [j.id for j in reopened.list(order="asc")[0]] == [j.id for j in jobs]
    assert reopened.get(jobs[0].id).status == "completed" and reopened.count_active() == 2
    _job(store, "a", "after the crash")  # the old engine reconnects
    assert len(reopened.list(limit=10)[0]) == 4


def test_unusable_store_is_one_line_naming_the_url_without_its_password(postgres_server, tmp_path):
    dead = f"postgresql://lumiere:s3cret@127.0.0.1:{postgres_server.port + 1}/nope"  # nothing listens there
    with pytest.raises(StoreError) as e:
        JobStore(dead)
    msg = str(e.value)
    assert "\n" not in msg and "s3cret" not in msg and "127.0.0.1" in msg and "LUMIERE_DB_URL" in msg
    with pytest.raises(StoreError, match="driver is not installed"):
        JobStore("postgresql+psycopg2://u:p@127.0.0.1/db")  # the cluster extra installs psycopg 3, not psycopg2
    with pytest.raises(StoreError, match="use sqlite:///PATH or postgresql://"):
        JobStore("nosuchdb://x")
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="cannot use the job store"):
        JobStore(f"sqlite:///{tmp_path / 'file' / 'jobs.db'}")  # parent is a file


def test_artifacts_local(tmp_path):
    store = ArtifactStore(str(tmp_path / "art"))
    store.put("video_1", "video.mp4", b"abc")
    assert store.get("video_1", "video.mp4") == b"abc" and store.get("video_1", "nope.png") is None
    store.delete_job("video_1")
    assert store.get("video_1", "video.mp4") is None and not (tmp_path / "art" / "video_1").exists()
    store.delete_job("video_never")  # nothing to delete is fine


def test_artifacts_s3():
    with local_s3() as (s3, options):
        s3.create_bucket(Bucket="videos")
        store = ArtifactStore("s3://videos/serve", options)
        store.put("video_1", "video.mp4", b"mp4 bytes")
        store.put("video_1", "thumbnail.png", b"png")
        assert s3.get_object(Bucket="videos", Key="serve/video_1/video.mp4")["Body"].read() == b"mp4 bytes"
        assert store.get("video_1", "thumbnail.png") == b"png"
        store.delete_job("video_1")
        assert store.get("video_1", "video.mp4") is None
        assert "Contents" not in s3.list_objects_v2(Bucket="videos", Prefix="serve/video_1/")


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
    from cli import main as cli
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

    for var, value in {"LUMIERE_MODEL_URI": "models:/lumiere-stunet@production", "LUMIERE_SSR_CHECKPOINT": "/ckpt/ssr",
                       "LUMIERE_DEVICE": "cuda", "LUMIERE_API_KEYS": "k1,k2",
                       "LUMIERE_DB_URL": sqlite_url(tmp_path / "jobs.db"), "LUMIERE_ARTIFACTS": "s3://b/serve"}.items():
        clean_env.setenv(var, value)
    encoder, generator, upsampler, settings = _parts(build_app(entry["args"]))  # what Serve calls with the YAML
    assert generator.init_args[0]["model_uri"] == "models:/lumiere-stunet@production"
    assert generator.init_args[0]["checkpoint"] is None and generator.init_args[0]["device"] == "cuda"
    assert upsampler.init_args[0]["checkpoint"] == "/ckpt/ssr"
    assert generator.ray_actor_options == upsampler.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 1}
    assert encoder.ray_actor_options == {"num_cpus": 0.25, "num_gpus": 0.25}  # it moves to CUDA too: reserved
    assert generator._deployment_config.autoscaling_config.max_replicas == 2  # the default ceiling
    assert settings["api_keys"] == ("k1", "k2") and settings["artifacts"] == "s3://b/serve"
    assert settings["db_url"] == sqlite_url(tmp_path / "jobs.db") and settings["model_name"] == "lumiere-stunet"

    # args (the YAML's, a lumiere serve flag) win over the environment; a fractional GPU; cpu: no GPUs
    clean_env.setenv("LUMIERE_NUM_GPUS", "0.5")
    clean_env.setenv("LUMIERE_MAX_MODEL_REPLICAS", "8")
    _, generator, upsampler, _ = _parts(build_app({"checkpoint": "/ckpt/stunet", "ssr_random_init": "tiny"}))
    assert generator._deployment_config.autoscaling_config.max_replicas == 8
    assert upsampler._deployment_config.autoscaling_config.max_replicas == 8
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
    assert args_with_env({}) == {"device": "cpu", "max_model_replicas": 2, "max_ingress_replicas": 2}
    env = {"LUMIERE_MODEL_URI": "models:/m@latest", "LUMIERE_CHECKPOINT": "/ckpt"}
    with pytest.raises(LumiereError, match="LUMIERE_CHECKPOINT or LUMIERE_MODEL_URI, not both"):
        args_with_env({}, env)
    assert args_with_env({"random_init": "tiny"}, env) == {"random_init": "tiny", "device": "cpu",
                                                           "max_model_replicas": 2, "max_ingress_replicas": 2}
    with pytest.raises(LumiereError, match="LUMIERE_DEVICE"):
        args_with_env({}, {"LUMIERE_DEVICE": "gpu"})
    with pytest.raises(LumiereError, match="LUMIERE_NUM_GPUS"):
        args_with_env({}, {"LUMIERE_DEVICE": "cuda", "LUMIERE_NUM_GPUS": "0"})
    assert args_with_env({}, {"LUMIERE_DEVICE": " cuda "})["num_gpus"] == 1
    with pytest.raises(LumiereError, match="LUMIERE_MAX_MODEL_REPLICAS"):
        args_with_env({}, {"LUMIERE_MAX_MODEL_REPLICAS": "lots"})
    with pytest.raises(LumiereError, match="LUMIERE_ENCODER_NUM_GPUS"):
        args_with_env({}, {"LUMIERE_DEVICE": "cuda", "LUMIERE_ENCODER_NUM_GPUS": "-1"})
    clean_env.setenv("LUMIERE_API_KEYS", "k1 acme,k2 acme extra")  # three fields: malformed, and the key unechoed
    with pytest.raises(LumiereError, match="entry 2 has 3 fields") as e:
        build_app({"random_init": "tiny"})
    assert "k2" not in str(e.value)


def test_keys_name_tenants_and_each_bare_key_is_its_own():
    from serve.tenants import parse_keys, tenant_for_token, tenant_of_key

    keys = parse_keys(["k-acme-1 acme", "k-acme-2 acme", "k-solo", "# a comment", ""])
    assert tenant_for_token("k-acme-1", keys) == tenant_for_token("k-acme-2", keys) == "acme"
    assert tenant_for_token("k-solo", keys) == tenant_of_key("k-solo") != tenant_of_key("k-other")
    assert tenant_of_key("k-solo").startswith("key-") and "k-solo" not in tenant_of_key("k-solo")
    assert tenant_for_token("k-acme", keys) is None and tenant_for_token("", keys) is None
    from lumiere.errors import LumiereError

    with pytest.raises(LumiereError, match="tenant name"):
        parse_keys(["k1 bad/name"])
