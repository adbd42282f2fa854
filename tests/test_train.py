"""Ray Train jobs on tiny configs: t2i then stunet with MLflow and the model registry, the conditional stunet
and the SSR, a killed worker, a killed driver, submission through the Ray Jobs API, and one-line errors for bad
input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ingest_shapes, mlflow_tracking_env, run_cli, run_clis

pytestmark = pytest.mark.timeout(900)
TINY = ["train.checkpoint_every=4", "train.log_every=2", "train.batch_size=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_session):
    """Standard 80-frame 128×128 shards of moving shapes (with 128×128 high-resolution copies for the SSR),
    embedded with the tiny config's text encoder."""
    return ingest_shapes(tmp_path_factory.mktemp("train-data"), 6, seed=3, overrides=["hr_size=128", "shard_clips=3"])


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    with mlflow_tracking_env(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


def _cfg(*extra):
    from lumiere.config import load_config

    return load_config("tiny", [*TINY, *extra])


@pytest.fixture(scope="module")
def t2i_run(shards, mlflow_uri, tmp_path_factory):
    from pipelines.train.job import run_training

    out = tmp_path_factory.mktemp("t2i")
    trace = out / "trace"
    trace.mkdir()
    old = os.environ.get("LUMIERE_DATA_TRACE")
    os.environ["LUMIERE_DATA_TRACE"] = str(trace)
    try:
        result = run_training("t2i", str(shards), str(out), _cfg("train.max_steps=8"), num_workers=2,
                              run_name="t2i-test", log=lambda *a: None)
    finally:
        if old is None:
            os.environ.pop("LUMIERE_DATA_TRACE")
        else:
            os.environ["LUMIERE_DATA_TRACE"] = old
    return out, result


def test_t2i_run_is_tracked_and_registered(t2i_run, mlflow_uri):
    import mlflow

    out, result = t2i_run
    assert result["step"] == 8 and (out / "checkpoints" / "latest" / "model.safetensors").exists()
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(result["run_id"])
    assert run.data.params["unet.base_channels"] == "8" and run.info.status == "FINISHED"
    assert run.data.tags["lumiere.torch_threads_per_worker"] == "1"  # a CPU worker holds 1 CPU by default
    losses = client.get_metric_history(result["run_id"], "loss")
    assert [m.step for m in losses] == [2, 4, 6, 8] and all(m.value > 0 for m in losses)
    for key in ("lr", "samples_per_s", "step_time_s"):
        assert client.get_metric_history(result["run_id"], key)
    # the logged loss is the mean over both ranks' steps since the last log, not rank 0's alone
    per_rank = [{e["step"]: e["loss"] for e in map(json.loads, (out / "trace" / f"rank{r}.jsonl").read_text()
                 .splitlines()) if "loss" in e} for r in (0, 1)]
    for m in losses:
        window = [per_rank[r][s] for r in (0, 1) for s in (m.step - 1, m.step)]
        assert abs(m.value - sum(window) / 4) < 1e-6, (m.step, m.value, window)
    assert any(abs(per_rank[0][m.step - 1] + per_rank[0][m.step] - 2 * m.value) > 1e-6 for m in losses)
    # samples: rendered off the gang at step 4 (checkpoint_every) and at the end; while the step-4 render ran,
    # training went on (losses of later steps were logged before it ended)
    samples = [f.path for f in client.list_artifacts(result["run_id"], "samples")]
    assert samples and all(p.endswith(".mp4") for p in samples)
    assert {p.split("/")[-1][:11] for p in samples} == {"step0000004", "step0000008"}
    ended = {m.step: m.value for m in client.get_metric_history(result["run_id"], "sample_ended_at")}
    started = {m.step: m.value for m in client.get_metric_history(result["run_id"], "sample_started_at")}
    assert sorted(ended) == [4, 8] and started[4] < ended[4]
    assert [m.step for m in losses if m.step > 4 and m.timestamp / 1000 < ended[4]], (losses, ended)
    assert "models:/lumiere-t2i@candidate" in result["model_uri"]


def test_stunet_from_t2i_keeps_the_prior_and_loads_from_the_registry(t2i_run, shards, mlflow_uri, tmp_path):
    import mlflow

    from lumiere.pipeline import TextToVideo
    from pipelines.train.job import run_training

    t2i_out, _ = t2i_run
    result = run_training("stunet", str(shards), str(tmp_path), _cfg("train.max_steps=4"), num_workers=2,
                          init_from=str(t2i_out), run_name="stunet-test", log=lambda *a: None)
    assert result["step"] == 4
    prior = load_file(t2i_out / "checkpoints" / "latest" / "ema.safetensors")
    trained = load_file(Path(result["checkpoint"]) / "model.safetensors")
    for name, weight in prior.items():
        assert torch.equal(trained[f"prior.{name}"], weight), f"prior weight {name} changed"
    assert mlflow.MlflowClient(tracking_uri=mlflow_uri).get_metric_history(result["run_id"], "loss")

    # registered as a candidate; `lumiere models promote` makes it production, which Serve loads
    version = result["model_uri"].split("(version ")[1].rstrip(")")
    assert result["model_uri"].startswith("models:/lumiere-stunet@candidate")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    promoted = run_cli("models", "promote", "lumiere-stunet", version, env=env, timeout=120)
    assert promoted.returncode == 0 and f"models:/lumiere-stunet@production -> version {version}" in promoted.stdout
    listed = run_cli("models", "list", "lumiere-stunet", env=env, timeout=120)
    assert f"version {version}  aliases candidate,production  step 4" in listed.stdout, listed.stdout
    missing = run_cli("models", "promote", "lumiere-stunet", "99", env=env, timeout=120)
    assert missing.returncode == 2 and "has no version 99" in missing.stderr, missing.stderr
    mlflow.set_tracking_uri(mlflow_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri="models:/lumiere-stunet@production",
                                                dst_path=str(tmp_path / "registry"))
    video = TextToVideo.from_checkpoint(local).generate(["a red square moving right"], steps=2).videos
    assert video.shape == (1, 8, 32, 32, 3)


def test_conditional_stunet_and_ssr_train_and_generate(t2i_run, shards, mlflow_uri, tmp_path):
    """`train stunet --conditional` from a t2i run, `train ssr` on the high-resolution copies, then i2v and
    MultiDiffusion upsampling with the two checkpoints."""
    import mlflow
    import numpy as np

    from lumiere.pipeline import TextToVideo, Upsampler
    from pipelines.train.job import run_training

    t2i_out, _ = t2i_run
    quiet = {"log": lambda *a: None, "num_workers": 1}
    # 1 worker x 2 CPUs: the worker trains with 2 torch threads (as it reports to MLflow)
    cond = run_training("stunet", str(shards), str(tmp_path / "cond"), _cfg("train.max_steps=4",
                        "stunet.conditional=true"), init_from=str(t2i_out), run_name="cond-test", cpus_per_worker=2,
                        **quiet)
    ssr = run_training("ssr", str(shards), str(tmp_path / "ssr"), _cfg("train.max_steps=4"), run_name="ssr-test",
                       **quiet)
    assert cond["step"] == 4 and ssr["step"] == 4
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_run(cond["run_id"]).data.tags["lumiere.torch_threads_per_worker"] == "2"
    assert client.get_run(ssr["run_id"]).data.tags["lumiere.torch_threads_per_worker"] == "1"
    assert "lumiere-ssr@candidate" in ssr["model_uri"]
    gen = TextToVideo.from_checkpoint(cond["checkpoint"])
    assert gen.conditional and gen.model.conv_in.in_channels == 7
    prior = load_file(t2i_out / "checkpoints" / "latest" / "ema.safetensors")
    trained = load_file(Path(cond["checkpoint"]) / "model.safetensors")
    assert all(torch.equal(trained[f"prior.{k}"], v) for k, v in prior.items())  # the prior stays frozen
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:16, 8:16] = (220, 30, 30)
    video = gen.generate(["a red square moving right"], task="i2v", image=image, steps=2).videos
    assert video.shape == (1, 8, 32, 32, 3) and np.array_equal(video[0, 0], image)
    up = Upsampler.from_checkpoint(ssr["checkpoint"]).upsample(video, ["a red square moving right"], steps=2)
    assert up.videos.shape == (1, 8, 64, 64, 3)


def test_ssr_needs_high_resolution_copies(shards):
    from lumiere.errors import LumiereError
    from pipelines.train.shards import check_manifest

    manifest = json.loads((shards / "manifest.json").read_text())
    with pytest.raises(LumiereError, match="re-ingest with --set hr_size=64"):
        check_manifest({**manifest, "hr_size": None}, _cfg(), str(shards), None, "ssr")
    check_manifest(manifest, _cfg(), str(shards), None, "ssr")


def test_data_plans_deal_every_clip_once_per_epoch_in_a_seeded_order():
    import numpy as np

    from pipelines.train.shards import rank_plan, unit_rows

    def rows(units):
        return [(u["path"], int(r)) for u in units for r in unit_rows(u, np.arange(sizes[u["path"]]))]

    def check(shards, world, epoch_rows):
        plans = [rank_plan(shards, r, world, rows=3 * epoch_rows, seed=7) for r in range(world)]
        for plan in plans:  # plan indices are consecutive from 0
            assert [u["start"] for u in plan] == list(np.cumsum([0] + [u["count"] for u in plan[:-1]]))
            assert sum(u["count"] for u in plan) >= 3 * epoch_rows
            assert all(len(unit_rows(u, np.arange(sizes[u["path"]]))) == u["count"] for u in plan)
        dealt = [rows(p) for p in plans]
        assert abs(len(dealt[0]) - len(dealt[-1])) <= max(len(r) for _, r in shards)  # balanced
        return plans, dealt

    sizes = {f"s{i}": 5 for i in range(6)} | {"only": 3} | {f"b{i}": 64 for i in range(4)}
    shards = [(f"s{i}", np.arange(5)) for i in range(6)]  # whole shards per worker
    plans, dealt = check(shards, world=2, epoch_rows=30)
    first_epoch = sorted(rows([u for p in plans for u in p if u["start"] < 15])[:30])
    assert first_epoch == sorted((f"s{i}", r) for i in range(6) for r in range(5))
    assert not set(p for p, _ in rows(plans[0][:3])) & set(p for p, _ in rows(plans[1][:3]))
    assert rows(rank_plan(shards, 1, 2, 90, seed=7)) == rows(plans[1])  # seeded
    assert rows(rank_plan(shards, 1, 2, 90, seed=8)) != rows(plans[1])
    # fewer shards than workers (1 shard of 3 clips, 2 workers): rows are dealt round-robin, so epoch 1 gives
    # worker 0 two clips and worker 1 the third, epoch 2 the other way round
    plans, dealt = check([("only", np.arange(3))], world=2, epoch_rows=3)
    assert sorted(dealt[0][:2] + dealt[1][:1]) == [("only", 0), ("only", 1), ("only", 2)]
    assert sorted(dealt[0][2:3] + dealt[1][1:3]) == [("only", 0), ("only", 1), ("only", 2)]
    # a batch draws distinct clips: consecutive rows of one worker come from a shuffled shard
    big = rank_plan([(f"b{i}", np.arange(64)) for i in range(4)], 0, 2, 4096, seed=0)
    seq = rows(big)
    assert np.mean([len(set(seq[i : i + 8])) for i in range(0, 4096, 8)]) > 7.5


def _ray_train_worker_pids():
    """PIDs of live Ray Train worker processes (Ray names them `ray::RayTrainWorker...`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::RayTrainWorker"):
                pids.append(int(entry.name))
    return sorted(pids)


def _wait_for(predicate, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def _has_checkpoint(storage: Path) -> bool:
    """True once Ray Train's controller has registered a checkpoint (not just copied its files)."""
    for snapshot in storage.rglob("checkpoint_manager_snapshot.json") if storage.exists() else []:
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except (OSError, json.JSONDecodeError):
            pass  # being rewritten: look again
    return False


def _trained_rows(trace: Path, steps: int, bs: int = 2, workers: int = 2) -> int:
    """Check a run's data trace (LUMIERE_DATA_TRACE): every step 1..steps trained on each worker's plan rows
    (step - 1)·bs … step·bs − 1, redone steps on the same rows; returns how many worker-steps were redone."""
    redone = 0
    for rank in range(workers):
        by_step = {}
        for line in (trace / f"rank{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            if "rows" in entry:  # (the other lines are the step's loss)
                by_step.setdefault(entry["step"], []).append(entry["rows"])
        assert sorted(by_step) == list(range(1, steps + 1)), (rank, sorted(by_step))
        for step, seen in by_step.items():
            assert all(rows == list(range((step - 1) * bs, step * bs)) for rows in seen), (rank, step, seen)
        assert len(by_step[1]) == 1  # resumed from a checkpoint: the first steps were not trained again
        redone += sum(len(seen) - 1 for seen in by_step.values())
    return redone


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(shards, mlflow_uri, tmp_path, monkeypatch):
    import mlflow

    from pipelines.train.job import run_training

    monkeypatch.setenv("LUMIERE_DATA_TRACE", str(tmp_path / "trace"))
    (tmp_path / "trace").mkdir()
    result = {}

    def train():
        result.update(run_training("t2i", str(shards), str(tmp_path), _cfg("train.max_steps=40"), num_workers=2,
                                   run_name="t2i-kill-worker", log=lambda *a: None))

    thread = threading.Thread(target=train)
    thread.start()
    _wait_for(lambda: _has_checkpoint(tmp_path / "ray"), what="the first checkpoint")
    pids = _ray_train_worker_pids()
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)
    # the fault happened and was handled: the gang was restarted on new worker processes
    restarted = []
    _wait_for(lambda: restarted.extend(set(_ray_train_worker_pids()) - set(pids)) or restarted or not thread.is_alive(),
              timeout=300, what="new Train worker processes")
    thread.join(timeout=600)
    assert restarted, "no new Train worker process appeared: the kill was not seen as a failure"
    assert result.get("step") == 40
    steps = [m.step for m in mlflow.MlflowClient(tracking_uri=mlflow_uri).get_metric_history(result["run_id"], "loss")]
    assert steps.count(2) == 1 and steps.count(4) == 1  # resumed from a checkpoint, not from scratch
    assert max(steps) == 40
    _trained_rows(tmp_path / "trace", 40)  # the exact data position: no row lost or trained twice


@pytest.mark.slow
def test_killed_driver_rerun_with_same_name_resumes(shards, mlflow_uri, tmp_path, ray_session):
    import ray

    cmd = [sys.executable, "-m", "cli.main", "train", "t2i", "--data", str(shards), "--output", str(tmp_path),
           "--config", "tiny", "--num-workers", "2", "--max-steps", "40", "--run-name", "t2i-kill-driver",
           "--address", ray.get_runtime_context().gcs_address, *sum((["--set", o] for o in TINY), [])]
    (tmp_path / "trace").mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "LUMIERE_DATA_TRACE": str(tmp_path / "trace")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    _wait_for(lambda: _has_checkpoint(tmp_path / "ray"), what="the first checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _wait_for(lambda: not _ray_train_worker_pids(), timeout=120, what="the killed run's workers to exit")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logs = done.stdout + done.stderr
    assert "resumed from checkpoint at step" in logs
    assert "resumed from checkpoint at step 0" not in logs
    assert "done at step 40" in logs
    assert "rows per worker" in logs  # the data position came back with the checkpoint
    _trained_rows(tmp_path / "trace", 40)
    # one MLflow run for the whole training, as the README says: the rerun continued the killed run's record
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="attributes.run_name = 't2i-kill-driver'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    steps = sorted({m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")})
    assert steps == list(range(2, 41, 2)), steps  # the killed part and the resumed part, every log step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_with_address_to_a_local_head(shards, mlflow_uri, tmp_path):
    gcs, dash = _free_port(), _free_port()
    # every fixed-default port on free ones: the test session's own Ray already holds the dashboard agent's
    # default 52365, and a second agent that cannot bind it never becomes ready ("No available agent")
    ports = {flag: _free_port() for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "runtime-env-agent-port", "metrics-export-port",
                                             "ray-client-server-port")}
    ray_bin = str(Path(sys.executable).parent / "ray")
    # a head of its own, on loopback, without Ray 2.60's token auth (the test's client would need the token)
    # the job's entrypoint is `lumiere …` on the head, as in the cluster image: the venv's bin on its PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={temp_dir}", *(f"--{flag}={port}" for flag, port in ports.items())],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        proc = run_cli("train", "t2i", "--data", str(shards), "--output", str(tmp_path / "run"), "--config", "tiny",
                       "--max-steps", "4", "--run-name", "t2i-submitted", "--address", f"http://127.0.0.1:{dash}",
                       *sum((["--set", o] for o in TINY), []), timeout=600, env=env, retries_until_up=60)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "SUCCEEDED" in proc.stdout and "done at step 4" in proc.stdout
        assert (tmp_path / "run" / "checkpoints" / "latest" / "meta.json").exists()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _one_line(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs_fail_before_training(shards, t2i_run, tmp_path, ray_session):
    import ray

    base = ["train", "t2i", "--output", str(tmp_path / "o"), "--config", "tiny"]

    def t2i(name, *args):  # its own output directory: the runs are side by side
        return ["train", "t2i", "--output", str(tmp_path / f"o-{name}"), "--config", "tiny", *args]

    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = json.loads((shards / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**manifest, "shards": [], "clips": 0}))
    future = tmp_path / "future"
    future.mkdir()
    (future / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    moved = tmp_path / "moved"  # a manifest whose shard files are gone (moved, deleted, or a stale copy)
    moved.mkdir()
    (moved / "manifest.json").write_text(json.dumps(manifest))
    t2i_out, _ = t2i_run
    n_shards = len(manifest["shards"])
    cases = [  # (CLI arguments, what its one-line error must say); independent runs, so run side by side
        (t2i("nowhere", "--data", str(tmp_path / "nowhere")), "no manifest.json"),
        (t2i("empty", "--data", str(empty)), "has no clips"),
        (t2i("future", "--data", str(future)), "schema version 99"),
        (t2i("moved", "--data", str(moved)), f"lists {n_shards} of {n_shards} shard files that do not exist"),
        (t2i("text", "--data", str(shards), "--set", "text.seed=5"), "another text encoder"),
        (["train", "stunet", "--data", str(shards), "--output", str(tmp_path / "s1"), "--config", "tiny",
          "--init-from", str(t2i_out), "--set", "unet.base_channels=16"], "differs in unet.base_channels"),
        (["train", "stunet", "--data", str(shards), "--output", str(tmp_path / "s2"), "--config", "tiny"],
         "needs --init-from"),
        (["train", "ssr", "--data", str(shards), "--output", str(tmp_path / "r"), "--config", "tiny",
          "--init-from", str(t2i_out)], "`train ssr` continues from a ssr checkpoint only"),
        (t2i("cond", "--data", str(shards), "--conditional"), "--conditional applies to"),
    ]
    for (_args, needle), proc in zip(cases, run_clis(*(args for args, _ in cases)), strict=True):
        _one_line(proc, needle)
    # joining a running cluster, Ray itself may log a connection line first; our error is still one line, last
    gcs = ray.get_runtime_context().gcs_address
    # the CPUs asked for are workers x --cpus-per-worker
    proc = run_cli(*base, "--data", str(shards), "--num-workers", "2", "--cpus-per-worker", "32", "--address", gcs)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "needs 64 CPUs" in proc.stderr


@pytest.mark.timeout(300)
def test_gpu_training_on_a_cluster_without_gpus_yet_is_submitted_not_refused(shards, mlflow_uri, tmp_path,
                                                                              ray_session):
    """`--gpu` against a cluster whose head has no GPU (an autoscaling GPU group at 0 nodes): the run is not
    refused; Ray Train asks for the GPUs (a pending placement group the autoscaler would act on) and waits.
    No GPU worker can start here, so the test stops the driver once the request is seen (GPU nodes cannot be
    simulated on this machine; the request is what an autoscaler acts on)."""
    import ray
    from ray.util import placement_group_table

    cmd = [sys.executable, "-m", "cli.main", "train", "t2i", "--data", str(shards), "--output", str(tmp_path),
           "--config", "tiny", "--num-workers", "1", "--gpu", "--max-steps", "4", "--run-name", "t2i-wants-gpus",
           "--address", ray.get_runtime_context().gcs_address, *sum((["--set", o] for o in TINY), [])]
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ,
                            "MLFLOW_TRACKING_URI": mlflow_uri}, start_new_session=True)

    def gpu_request_pending() -> bool:
        return any(pg["state"] in ("PENDING", "RESCHEDULING") and any(b.get("GPU") for b in pg["bundles"].values())
                   for pg in placement_group_table().values())

    try:
        _wait_for(lambda: gpu_request_pending() or proc.poll() is not None, timeout=180,
                  what="a pending GPU placement group")
        text = (tmp_path / "driver.log").read_text()
        assert proc.poll() is None, text[-3000:]  # still waiting for GPUs, not refused
        assert "waits up to 1800 s for the autoscaler" in text, text[-3000:]
        assert "needs 1 GPUs but the Ray cluster has" not in text and "no CUDA device" not in text
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    _wait_for(lambda: not gpu_request_pending(), timeout=120, what="the killed driver's GPU request to go")


def test_fsdp_run_with_grad_accum_shards_its_checkpoint_and_resumes_on_another_worker_count(shards, mlflow_uri,
                                                                                              tmp_path):
    """train.parallelism=fsdp through Ray Train (2 gloo workers), with grad_accum and activation checkpointing: every
    rank writes its shard of the optimizer state into the one checkpoint Ray Train assembles, rank 0 the full
    weights; the same run then resumes on 1 worker (the shards resharded) and a DDP resume is refused. System
    metrics and the data-wait time are in the run."""
    import mlflow

    from lumiere.checkpoint import load_model, read_meta
    from pipelines.train.job import run_training

    fsdp = ["train.parallelism=fsdp", "train.grad_accum=2", "train.activation_checkpointing=true"]
    first = run_training("t2i", str(shards), str(tmp_path), _cfg("train.max_steps=8", *fsdp), num_workers=2,
                         run_name="t2i-fsdp", system_metrics_interval_s=0.5, log=lambda *a: None)
    latest = Path(first["checkpoint"])
    assert first["step"] == 8 and read_meta(latest)[1]["parallelism"] == "fsdp"
    # both ranks' shards in the one checkpoint directory Ray Train assembled, beside rank 0's full weights
    assert sorted(p.name for p in (latest / "train_dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    model, _, _ = load_model(latest)  # the full weights (for serving / --init-from), not shards
    assert sum(p.numel() for p in model.parameters()) > 0

    again = run_training("t2i", str(shards), str(tmp_path), _cfg("train.max_steps=12", *fsdp), num_workers=1,
                         run_name="t2i-fsdp", system_metrics_interval_s=0, log=lambda *a: None)
    assert again["step"] == 12 and again["run_id"] == first["run_id"]
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    steps = [m.step for m in client.get_metric_history(first["run_id"], "loss")]
    assert sorted(steps) == [2, 4, 6, 8, 10, 12], steps  # resumed at step 8, nothing trained twice
    metrics = client.get_run(first["run_id"]).data.metrics
    assert "data_wait_s" in metrics and 0 <= metrics["data_wait_fraction"] <= 1
    assert any(k.startswith("system/node0/") and "cpu_utilization" in k for k in metrics), sorted(metrics)[:20]

    with pytest.raises(Exception, match="train.parallelism=fsdp"):  # DDP cannot read FSDP's optimizer layout
        run_training("t2i", str(shards), str(tmp_path), _cfg("train.max_steps=14"), num_workers=1,
                     run_name="t2i-fsdp", max_failures=0, system_metrics_interval_s=0, log=lambda *a: None)
