"""`lumiere train {t2i,stunet,ssr}`: Ray Train V2 jobs over ingestion shards, with MLflow and fault tolerance.

    driver   validate data / init checkpoint / cluster size      one-line errors before anything starts
             MLflow run (created, or found again by run name)     rank 0 logs into it
             TorchTrainer(train_loop, datasets={"train": clips})  RunConfig(name, storage_path): same name resumes
    workers  build model (t2i: the 2D prior; stunet: inflate the t2i checkpoint, prior frozen — with
             stunet.conditional the 7-channel ⟨J, C, M⟩ model, from a t2i or an unconditional stunet; ssr: the
             super-resolution STUNet on high-resolution windows)
             DDP via prepare_model (gloo on CPU, nccl on GPU); bf16 autocast / torch.compile on GPU
             restore from ray.train.get_checkpoint() if any (weights, EMA, optimizer, schedule, step, RNG)
             loop: iter_torch_batches -> TrainStep (the loop shared with the demo) -> metrics / checkpoints
    driver   copy the final checkpoint to OUTPUT/checkpoints/, register it in the MLflow Model Registry

Data: every worker reads its own plan (pipelines.train.shards.rank_plan: shards and rows in an order seeded by
train.seed, whole epochs back to back), unsplit and in order, so which rows a step trains on is fixed by the
config and worker count alone. A checkpoint records the data position (rows trained per worker); a resume —
after a killed worker or a re-run with the same --run-name — continues from exactly that row, and the rows
before it are never read again. A killed worker costs at most the steps since the last checkpoint
(`train.checkpoint_every`), and those steps are redone on the same rows.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lumiere import storage
from lumiere.checkpoint import (
    build_prior,
    build_ssr,
    build_stunet,
    load_train_state,
    load_weights,
    read_meta,
    save_checkpoint,
)
from lumiere.config import LumiereConfig, build_config
from lumiere.errors import LumiereError
from lumiere.model_uri import fetch, publish, resolve_model, s3_checkpoint
from lumiere.parallel import set_activation_checkpointing, shard_model

from .shards import DataPosition, check_manifest, check_shard_files, clip_datasets, read_manifest

KINDS = ("t2i", "stunet", "ssr")
PLAN_VERSION = 1  # of pipelines.train.shards.rank_plan: a checkpoint's data position means nothing under another
SAMPLE_PROMPTS = ["a red square moving right", "a blue circle moving down"]


@dataclass
class TrainJob:
    """What the driver hands every worker (plain data: it is pickled to the workers)."""

    kind: str
    cfg: dict
    init_from: str | None
    mlflow_uri: str
    mlflow_run_id: str
    text_fingerprint: str
    use_gpu: bool = False
    cpu_threads: int = 1  # torch threads of a CPU worker: the CPUs it holds (--cpus-per-worker)
    compile: bool = False
    sample_every: int = 0  # steps between sample renders (a Ray task off the gang); 0: none
    sample_num_gpus: float = 0.0  # GPUs a sample render task reserves (0: it renders on a CPU)
    sample_prompts: list[str] = field(default_factory=lambda: list(SAMPLE_PROMPTS))
    data_position: Any = None  # the DataPosition actor's handle (pipelines.train.shards)
    plan_rows: int = 0  # rows in each worker's data plan
    data_trace: str | None = None  # a directory: each worker appends the plan rows of every step (tests)
    system_metrics_interval_s: float = 10.0  # MLflow system metrics, sampled per node; 0: off


# --- the worker side ---------------------------------------------------------------------------------------
def build_for_training(kind: str, cfg: LumiereConfig, init_from: str | None) -> torch.nn.Module:
    """t2i: a fresh prior (or one to fine-tune); stunet: the t2i prior inflated (or a stunet to continue)."""
    if init_from and storage.is_s3(init_from):  # each worker downloads its own copy: no volume shared with the driver
        with tempfile.TemporaryDirectory(prefix="lumiere-init-") as d:
            return build_for_training(kind, cfg, fetch(init_from, d, _worker_storage))
    if kind == "t2i":
        model = build_prior(cfg)
        if init_from:
            load_weights(model, Path(init_from), use_ema=True)
        return model
    if kind == "ssr":
        model = build_ssr(cfg)
        if init_from:
            load_weights(model, Path(init_from), use_ema=True)
        return model
    _, meta = read_meta(init_from)
    if meta["kind"] == "t2i":
        prior = build_prior(cfg)
        load_weights(prior, Path(init_from), use_ema=True)
        return build_stunet(cfg, prior)
    model = build_stunet(cfg)
    # an unconditional stunet starts a conditional one: its wider first conv keeps the prior-based init
    load_weights(model, Path(init_from), use_ema=True, may_miss=("conv_in.",) if cfg.stunet.conditional else ())
    return model


def render_samples(kind: str, cfg_dict: dict, ema_state: dict, step: int, prompts: list[str], mlflow_uri: str,
                   run_id: str) -> dict:
    """A Ray task with its own resources, off the training gang: build the model from the EMA weights a worker
    handed over, render the fixed prompts and log them to the run as mp4 artifacts (samples/), with when the
    render started and ended as metrics (`sample_started_at`, `sample_ended_at`, unix seconds) at the step
    the weights are from. Training never waits for it."""
    import mlflow
    from mlflow.entities import Metric

    from lumiere.pipeline import TextToVideo
    from lumiere.text_encoder import TextEncoder
    from lumiere.video import write_mp4

    started = time.time()
    cfg = build_config(cfg_dict)
    model = build_stunet(cfg) if kind == "stunet" else build_prior(cfg)
    model.load_state_dict(ema_state)
    stunet = model.eval() if kind == "stunet" else build_stunet(cfg, model).eval()
    gen = TextToVideo(stunet, TextEncoder(cfg.text), cfg, "training sample")
    result = gen.generate(prompts, seed=0, steps=min(cfg.sample.steps, 20))
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    with tempfile.TemporaryDirectory() as d:
        for i, video in enumerate(result.videos):
            path = Path(d) / f"step{step:07d}_{i}_{'_'.join(prompts[i].split())[:40]}.mp4"
            write_mp4(path, video, fps=result.fps)
            client.log_artifact(run_id, str(path), artifact_path="samples")
    ended = time.time()
    ms = int(ended * 1000)
    client.log_batch(run_id, metrics=[Metric("sample_started_at", started, ms, step),
                                      Metric("sample_ended_at", ended, ms, step),
                                      Metric("sample_render_s", ended - started, ms, step)])
    return {"step": step, "seconds": ended - started, "videos": len(result.videos)}


class SampleRenderer:
    """Rank 0's handle on the sample renders: each is a Ray task (`render_samples`) on its own CPU (or
    `num_gpus`), started with a CPU copy of the EMA weights; training goes on at once. One render at a time:
    a sample due while the last one still runs is skipped (said in the log), so slow renders never pile up.
    `finish` waits (bounded) for the last render at the end of the run, so its videos land in the run."""

    def __init__(self, job: TrainJob):
        self.job, self.pending = job, None

    def busy(self) -> bool:
        import ray

        return self.pending is not None and not ray.wait([self.pending], timeout=0)[0]

    def start(self, state: dict, step: int) -> None:
        """Render from `state` (the EMA weights on the CPU) in a task of its own; skipped while one runs."""
        import ray

        if self.busy():
            _say(f"[train] step {step}: the last sample render is still running; this one is skipped")
            return
        task = ray.remote(render_samples).options(num_cpus=1, num_gpus=self.job.sample_num_gpus or 0,
                                                  max_retries=1)
        self.pending = task.remote(self.job.kind, self.job.cfg, state, step, self.job.sample_prompts,
                                   self.job.mlflow_uri, self.job.mlflow_run_id)

    def finish(self, timeout_s: float = 1800) -> None:
        import ray

        if self.pending is None:
            return
        try:
            ray.get(self.pending, timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - a failed sample never fails the training run
            _say(f"[train] the last sample render did not finish: {type(e).__name__}: {str(e)[:300]}")


_worker_storage = None  # lumiere.storage.StorageOptions from the driver, in a worker process (_train_loop_entry)


def _train_loop_entry(config: dict) -> None:
    """The workers' entry point: the driver's S3 settings (for an s3:// init checkpoint) travel in the config, as
    the data's filesystem does, so workers never depend on their own environment; then the training loop."""
    global _worker_storage
    config = dict(config)
    _worker_storage = config.pop("storage_options", None)
    train_loop_per_worker(config)


def _say(line: str) -> None:
    """One progress line from a training worker, once. Ray Train patches `print` to log through its logger and
    also prints when sys.stdout has been wrapped, as it is in the workers here: every line reached the driver twice.
    A print to the process's real stdout is left alone by the patch, and Ray forwards it once."""
    print(line, file=sys.__stdout__, flush=True)


def train_loop_per_worker(job_dict: dict) -> None:
    import ray.train
    import ray.train.torch

    from lumiere.diffusion import Conditioning
    from lumiere.trainer import TrainStep, clips_to_model

    job = TrainJob(**job_dict)
    cfg = build_config(job.cfg)
    if cfg.train.retain_host_memory:
        from lumiere.allocator import retain_freed_memory

        retain_freed_memory()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    if not job.use_gpu:  # one torch thread per CPU the worker holds (more would contend with the other workers)
        torch.set_num_threads(job.cpu_threads)
    torch.manual_seed(cfg.train.seed + rank)

    model = build_for_training(job.kind, cfg, job.init_from).to(device)
    set_activation_checkpointing(model, cfg.train.activation_checkpointing)
    world = ctx.get_world_size()
    plan = {"workers": world, "seed": cfg.train.seed, "version": PLAN_VERSION}
    consumed = 0  # rows of this worker's plan trained on: the data position
    fsdp = cfg.train.parallelism == "fsdp"
    restored = ray.train.get_checkpoint()
    with contextlib.ExitStack() as open_checkpoint:
        d = Path(open_checkpoint.enter_context(restored.as_directory())) if restored is not None else None
        if d is not None:
            written_with = read_meta(d)[1].get("parallelism", "ddp")
            if written_with != cfg.train.parallelism:
                raise LumiereError(f"the run's checkpoint was written with train.parallelism={written_with}; resume "
                                   f"it with --set train.parallelism={written_with} (its optimizer state is laid "
                                   "out for that)")
            load_weights(model, d, use_ema=False)  # the full weights, before sharding: any worker count
        if fsdp:  # FSDP2: weights, grads, optimizer state and EMA sharded over the ranks (gloo on CPU, nccl on GPU)
            forward = shard_model(model, device, torch.bfloat16 if job.use_gpu else None)
        else:  # DDP (a plain module for one worker)
            forward = ray.train.torch.prepare_model(model, move_to_device=False)
        if job.compile and job.use_gpu:
            forward = torch.compile(forward)
        amp = torch.bfloat16 if job.use_gpu else None
        step_fn = TrainStep(model, cfg, job.kind, forward=forward, amp_dtype=amp, rank=rank)
        if d is not None:
            from safetensors.torch import load_file

            ema = load_file(d / "ema.safetensors") if not fsdp and (d / "ema.safetensors").exists() else None
            rng = step_fn.load_state_dict(load_train_state(d), ema)
            step_fn.load_shards(d)  # FSDP: optimizer state and EMA, resharded to this worker count (a collective)
            saved = read_meta(d)[1].get("data_position") or {}
    if restored is not None:
        if {k: saved.get(k) for k in plan} == plan:
            consumed = int(saved["rows_per_worker"])
            where = f"data position {consumed} rows per worker"
        else:  # another worker count or seed deals the data differently: a fresh plan
            where = f"a new data plan (the checkpoint's was {saved or 'not recorded'})"
        _say(f"[train] rank {rank}: resumed from checkpoint at step {step_fn.step}, {where}, random numbers from {rng}")
    needed = consumed + (cfg.train.max_steps - step_fn.step) * cfg.train.batch_size
    if step_fn.step < cfg.train.max_steps and needed > job.plan_rows:
        raise LumiereError(f"the run is at step {step_fn.step} with {consumed} rows per worker trained; "
                           f"{cfg.train.max_steps - step_fn.step} more steps of batch {cfg.train.batch_size} need "
                           f"{needed} plan rows but the plan holds {job.plan_rows}: resume with the --batch-size "
                           "the run started with")
    if job.data_position is not None:
        ray.get(job.data_position.set.remote(consumed))  # the read stage skips what was trained on

    client = None
    renderer = SampleRenderer(job) if rank == 0 and job.sample_every else None
    if rank == 0:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=job.mlflow_uri)
        # what the worker really runs with (a tag, not a param: a resume may change it)
        client.set_tag(job.mlflow_run_id, "lumiere.torch_threads_per_worker", str(torch.get_num_threads()))

    def checkpoint_and_report(metrics: dict) -> None:
        generators = step_fn.gather_generators()  # a collective: every rank's random state goes into the checkpoint
        # the full weights and EMA for serving, on rank 0; under FSDP gathered shard by shard (every rank takes part)
        ema = step_fn.full_ema_state(keep=rank == 0)
        weights = step_fn.full_model_state(keep=rank == 0) if fsdp else None
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "ckpt"
            if rank == 0:
                save_checkpoint(
                    path, model, cfg, job.kind, step=step_fn.step, ema_state=ema, model_state=weights,
                    train_state=step_fn.state_dict(generators),
                    extra_meta={"text_fingerprint": job.text_fingerprint, "parallelism": cfg.train.parallelism,
                                "data_position": {**plan, "rows_per_worker": consumed}},
                )
            # FSDP: every rank writes its shard of the optimizer state and EMA; Ray Train merges the ranks'
            # directories into one checkpoint, so no rank ever holds the whole optimizer state
            step_fn.save_shards(path)
            ckpt = ray.train.Checkpoint.from_directory(str(path)) if path.exists() else None
            ray.train.report(metrics, checkpoint=ckpt)

    def ema_for_samples() -> dict | None:
        """The EMA weights a sample render gets (on rank 0); under FSDP gathered, so every rank calls this."""
        return step_fn.full_ema_state(keep=rank == 0) if fsdp or rank == 0 else None

    shard = ray.train.get_dataset_shard(f"train_rank{rank}")
    max_steps, t_last, window, bs = cfg.train.max_steps, time.perf_counter(), [], cfg.train.batch_size
    metrics = {"step": step_fn.step}
    trace = open(Path(job.data_trace) / f"rank{rank}.jsonl", "a") if job.data_trace else None  # noqa: SIM115
    monitor = _system_metrics(job, ctx, resumed=restored is not None)
    waits, t_ready = [], time.perf_counter()  # data wait: from the end of one step until the next batch is here
    if step_fn.step < max_steps:
        for batch in shard.iter_torch_batches(batch_size=bs, drop_last=True):
            waits.append(time.perf_counter() - t_ready)
            index = batch["plan_index"].tolist()
            if index != list(range(consumed, consumed + bs)):
                raise LumiereError(f"worker {rank} expected rows {consumed}..{consumed + bs - 1} of its data plan and "
                                   f"got {index[0]}..{index[-1]}: the loader is out of order")
            consumed += bs
            if trace is not None:
                trace.write(json.dumps({"step": step_fn.step + 1, "rows": index}) + "\n")
                trace.flush()
            clips = clips_to_model(batch["video"].to(device))
            cond = Conditioning(batch["context"].to(device), batch["pooled"].to(device))
            metrics = step_fn(clips, cond)
            window.append(metrics["loss"])
            if trace is not None:
                trace.write(json.dumps({"step": step_fn.step, "loss": metrics["loss"]}) + "\n")
            step = step_fn.step
            log_now = step % cfg.train.log_every == 0 or step == max_steps
            if log_now:  # every rank takes part: the logged loss is the mean over ranks, not rank 0's alone
                loss, n_window = _mean_over_ranks(sum(window) / len(window), device, world), len(window)
                window = []
            if rank == 0 and log_now:
                now = time.perf_counter()
                logged = {
                    "loss": loss, "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
                    "step_time_s": metrics["step_time_s"],
                    "samples_per_s": n_window * cfg.train.batch_size * world / (now - t_last),
                    # rank 0's wait for its loader since the last log: > 0.1 means the input pipeline is behind
                    "data_wait_s": sum(waits) / max(1, len(waits)),
                    "data_wait_fraction": sum(waits) / max(1e-9, now - t_last),
                }
                waits = []
                if device.type == "cuda":
                    logged["gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                else:
                    import resource

                    logged["cpu_maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                from mlflow.entities import Metric

                ms = int(time.time() * 1000)
                client.log_batch(job.mlflow_run_id,
                                 metrics=[Metric(k, float(v), ms, step) for k, v in logged.items()])
                _say(f"[train] {job.kind} step {step}/{max_steps} loss {logged['loss']:.4f} "
                     f"lr {logged['lr']:.2e} {logged['samples_per_s']:.1f} samples/s")
                t_last = now
            if job.sample_every and step % job.sample_every == 0 and step < max_steps:
                # (FSDP: the gather is a collective, so every rank runs it, busy renderer or not)
                if fsdp or (renderer is not None and not renderer.busy()):
                    state = ema_for_samples()
                    if renderer is not None:
                        renderer.start(state, step)
            if step % cfg.train.checkpoint_every == 0 and step < max_steps:
                checkpoint_and_report({"step": step, "loss": metrics["loss"]})
            if step >= max_steps:
                break
            t_ready = time.perf_counter()
    if step_fn.step < max_steps:
        raise LumiereError(f"worker {rank}'s data plan ran out at step {step_fn.step} of {max_steps} (position "
                           f"{consumed} of {job.plan_rows} rows)")
    if job.sample_every:  # the final weights' samples; the other ranks are done and wait in the last report
        state = ema_for_samples()
        if renderer is not None:
            renderer.finish()
            renderer.pending = None
            renderer.start(state, step_fn.step)
            renderer.finish()
    checkpoint_and_report({"step": step_fn.step, "loss": metrics.get("loss", float("nan")), "final": 1})
    if monitor is not None:
        monitor.finish()


def _system_metrics(job: TrainJob, ctx, resumed: bool):
    """MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory per GPU with nvidia-ml-py,
    in the `cluster` extra) from one worker per node, as `system/node<N>/…` in the run: pynvml sees every GPU of
    the node, so one sampler per node covers them all."""
    if not job.system_metrics_interval_s or ctx.get_local_rank() != 0:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(job.mlflow_run_id, sampling_interval=job.system_metrics_interval_s,
                                       node_id=f"node{ctx.get_node_rank()}", tracking_uri=job.mlflow_uri,
                                       resume_logging=resumed)
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - metrics about the machine never stop training
        _say(f"[train] system metrics are off on this node: {type(e).__name__}: {str(e)[:200]}")
        return None


def _mean_over_ranks(value: float, device: torch.device, world: int) -> float:
    """The mean of `value` over all ranks (an all-reduce every rank calls at the same step); one rank: itself."""
    if world <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


# --- the driver side ---------------------------------------------------------------------------------------
def check_init(kind: str, init: str | None, cfg: LumiereConfig) -> None:
    if kind == "stunet" and init is None:
        raise LumiereError("training a stunet needs --init-from a t2i checkpoint (the prior it inflates)")
    if init is None:
        return
    init_cfg, meta = read_meta(init)
    if kind in ("t2i", "ssr") and meta["kind"] != kind:
        raise LumiereError(f"--init-from {init} is a {meta['kind']} checkpoint; `train {kind}` continues from a "
                           f"{kind} checkpoint only")
    if kind == "stunet" and meta["kind"] == "ssr":
        raise LumiereError(f"--init-from {init} is an ssr checkpoint; a stunet starts from a t2i or stunet one")
    if kind == "stunet" and meta["kind"] == "stunet" and init_cfg.stunet.conditional and not cfg.stunet.conditional:
        raise LumiereError(f"--init-from {init} is a conditional stunet; continue it with --conditional")
    section = "ssr" if kind == "ssr" else "unet"
    diffs = [f"{section}.{k}" for k, v in asdict(getattr(cfg, section)).items()
             if k not in ("window", "overlap", "weighting", "steps", "guidance_scale")  # sampling-time only
             and getattr(getattr(init_cfg, section), k) != v]
    diffs += [f"text.{k}" for k, v in vars(cfg.text).items() if getattr(init_cfg.text, k) != v]
    if diffs:
        raise LumiereError(f"--init-from {init} was trained with another config ('{init_cfg.name}'): it differs in "
                           f"{', '.join(diffs[:5])}; use --config {init_cfg.name} or a matching checkpoint")


def mlflow_run(kind: str, run_name: str, cfg: LumiereConfig, tracking_uri: str) -> str:
    """The MLflow run for `run_name`: found again when resuming, created otherwise; params logged once."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    name = f"lumiere-{kind}"
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    found = client.search_runs([exp_id], filter_string=f"tags.`lumiere.run_name` = '{run_name}'")
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={"lumiere.run_name": run_name, "lumiere.kind": kind})
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value

    walk("", cfg.to_dict())
    from mlflow.entities import Param

    params = [Param(k, str(v)[:500]) for k, v in flat.items()]
    for i in range(0, len(params), 100):  # the tracking API takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    import yaml

    client.log_text(run.info.run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
    return run.info.run_id


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        # --address, or RAY_ADDRESS: set for a job's driver on a cluster (`--address http://…` submits through
        # the Jobs API, `ray job submit`, a KubeRay RayJob), which joins that cluster instead of starting one
        import logging

        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)  # errors stay one line
    else:
        ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 2)), include_dashboard=False)


def plan_rows(cfg: LumiereConfig) -> int:
    """Rows each worker's data plan holds: exactly the run's samples per worker. Not more: Ray Data decodes ahead
    of training as far as its buffers allow, and a plan twice as long cost the demo's t2i job ~25 s of decoding
    rows it never trained on."""
    return cfg.train.max_steps * cfg.train.batch_size


def run_training(kind: str, data: str, output: str, cfg: LumiereConfig, *, init_from: str | None = None,
                 num_workers: int = 1, cpus_per_worker: int = 1, gpu: bool = False, run_name: str | None = None,
                 address: str | None = None, compile: bool = False, max_failures: int = 3,
                 sample_every: int | None = None,
                 sample_num_gpus: float = 0.0, resource_timeout_s: float = 1800,
                 system_metrics_interval_s: float = 10.0, log=print) -> dict:
    """Train (or resume) and return {"checkpoint": path, "model_uri": ..., "step": ...}."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from lumiere.text_encoder import TextEncoder

    if kind not in KINDS:
        raise LumiereError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    if num_workers < 1:
        raise LumiereError("--num-workers must be >= 1")
    if cpus_per_worker < 1:
        raise LumiereError("--cpus-per-worker must be >= 1")
    # --output s3://…: Ray Train writes the checkpoints there from every worker (no shared volume needed)
    options = storage.StorageOptions.from_env()
    output_dir = None if storage.is_s3(output) else Path(output).resolve()
    output = output.rstrip("/") if output_dir is None else output
    run_name = run_name or f"{kind}-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    manifest = read_manifest(data)
    fingerprint = TextEncoder(cfg.text).fingerprint()
    check_manifest(manifest, cfg, data, fingerprint, kind)
    check_shard_files(manifest, data)
    if output_dir is None:
        _check_bucket(output, options)
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
    init = _init_for_workers(kind, init_from, cfg, output, output_dir, run_name, options)
    # on a cluster (--address, or RAY_ADDRESS as a submitted job's driver has) the workers run elsewhere: the GPUs
    # are theirs, not this process's, and an autoscaling GPU group may have none until the job asks for them
    on_cluster = bool(address or os.environ.get("RAY_ADDRESS"))
    if gpu and not torch.cuda.is_available() and not on_cluster:
        raise LumiereError("--gpu given but no CUDA device is visible here")

    _init_ray(address)
    have = ray.cluster_resources()
    need_key, per_worker = ("GPU", 1) if gpu else ("CPU", cpus_per_worker)
    need = num_workers * per_worker
    if have.get(need_key, 0) < need:
        # GPUs on a cluster are left to the autoscaler (a GPU group scales from zero); missing CPUs are refused
        if not (on_cluster and gpu):
            raise LumiereError(f"--num-workers {num_workers} needs {need} {need_key}s but the Ray cluster has "
                               f"{have.get(need_key, 0):g}; lower --num-workers or add nodes")
        log(f"[train] the cluster has {have.get(need_key, 0):g} of the {need} {need_key}s the workers need now; "
            f"Ray Train asks for them and waits up to {resource_timeout_s:g} s for the autoscaler to add nodes")

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    run_id = mlflow_run(kind, run_name, cfg, tracking_uri)
    where = "GPU" if gpu else f"CPU, {cpus_per_worker} thread(s) each"
    log(f"[train] {kind} run '{run_name}' ({num_workers} worker(s), {where}), "
        f"{manifest['clips']} clips from {data}; MLflow {tracking_uri} run {run_id}")
    job = TrainJob(kind=kind, cfg=cfg.to_dict(), init_from=init, mlflow_uri=tracking_uri, mlflow_run_id=run_id,
                   text_fingerprint=fingerprint, use_gpu=gpu, cpu_threads=cpus_per_worker, compile=compile,
                   # SSR samples need a base video to upsample: none are logged during SSR training
                   sample_every=0 if kind == "ssr" else cfg.train.checkpoint_every if sample_every is None
                   else sample_every,
                   sample_num_gpus=sample_num_gpus, system_metrics_interval_s=system_metrics_interval_s,
                   data_trace=os.environ.get("LUMIERE_DATA_TRACE"), plan_rows=plan_rows(cfg))
    # the data: one plan per worker, fixed by (seed, workers) alone, read unsplit and in order so a checkpoint's
    # data position (rows trained per worker) is exact; the position actor lets the read stage skip those rows
    position = ray.remote(num_cpus=0)(DataPosition).remote()
    datasets = clip_datasets(data, manifest, cfg, num_workers, job.plan_rows, position=position, kind=kind)
    ingest = copy.deepcopy(ray.data.DataContext.get_current().execution_options)  # Ray Train's default, plus:
    ingest.preserve_order = True
    # each worker's pipeline gets its share of the CPUs the workers leave: every executor would otherwise plan
    # with all of them, and the per-worker pipelines together would start more tasks than fit
    spare = max(1.0, have.get("CPU", 0) - num_workers * cpus_per_worker)  # what the Train workers hold
    ingest.resource_limits = ingest.resource_limits.copy(cpu=spare / num_workers)
    trainer = TorchTrainer(
        _train_loop_entry,
        train_loop_config={**asdict(job), "data_position": position, "storage_options": options},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_name, **_ray_storage(output, output_dir, options),
            # a worker group that cannot be placed is retried every WORKER_GROUP_START_TIMEOUT_S: bounded here,
            # so a cluster that never gets the resources ends the run with a message instead of waiting forever
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures,
                controller_failure_limit=max(1, math.ceil(resource_timeout_s / _WORKER_GROUP_START_TIMEOUT_S))),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=ingest),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        if "WorkerGroupStartupTimeout" in f"{type(e).__name__} {e!r} {e.__cause__!r}":
            now = ray.cluster_resources().get(need_key, 0)
            raise LumiereError(f"the {need} {need_key}s for --num-workers {num_workers} did not become available "
                               f"within {resource_timeout_s:g} s (the cluster has {now:g}); check the autoscaler / "
                               "GPU node group, or lower --num-workers") from None
        raise
    if result.checkpoint is None:
        raise LumiereError(f"training run '{run_name}' ended without a checkpoint: {result.error}")
    if output_dir is None:
        final, meta, model_uri = _publish_s3(result.checkpoint, kind, output, run_name, tracking_uri, run_id, options)
        log(f"[train] done at step {meta['step']}: checkpoint {final} ({output}/checkpoints/latest points at it); "
            f"registered {model_uri}")
        return {"checkpoint": final, "model_uri": model_uri, "step": meta["step"], "run_id": run_id,
                "run_name": run_name}
    final = output_dir / "checkpoints" / "latest"
    with result.checkpoint.as_directory() as d:
        tmp = output_dir / "checkpoints" / f".tmp-{run_name}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(d, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    _, meta = read_meta(final)
    model_uri = register(kind, final, tracking_uri, run_id)
    log(f"[train] done at step {meta['step']}: checkpoint {final}; registered {model_uri}")
    return {"checkpoint": str(final), "model_uri": model_uri, "step": meta["step"], "run_id": run_id,
            "run_name": run_name}


def _check_bucket(output: str, options: storage.StorageOptions) -> None:
    """A one-line error now for an s3:// --output whose bucket is missing or unreachable (not deep in Ray Train)."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(output, options)
    bucket = path.split("/", 1)[0]
    try:
        missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except OSError as e:
        raise LumiereError(f"--output {output}: cannot reach S3 ({str(e).splitlines()[0]}); check AWS_ENDPOINT_URL "
                           "and the credentials") from None
    if missing:
        raise LumiereError(f"--output {output}: the bucket '{bucket}' does not exist (create it, or check "
                           "AWS_ENDPOINT_URL)")


def _init_for_workers(kind: str, init_from: str | None, cfg: LumiereConfig, output: str, output_dir: Path | None,
                      run_name: str, options: storage.StorageOptions) -> str | None:
    """--init-from, checked (check_init), as the workers will load it. A local --output: a local checkpoint
    directory, as before (the workers see the driver's paths: one machine or a shared volume). An s3:// source:
    the s3:// checkpoint directory it names (a `latest` pointer followed now, so every worker, and a restarted
    one, loads the same version); each worker downloads it (build_for_training). An s3:// --output and a local or
    models:/ source: staged under OUTPUT/init/RUN_NAME/ on S3, since the workers share no volume with this driver."""
    if init_from is not None and storage.is_s3(init_from):
        init = s3_checkpoint(init_from, options)
        check_init(kind, init, cfg)
        return init
    if output_dir is not None or init_from is None:
        init = resolve_model(init_from, output_dir)
        check_init(kind, init, cfg)
        return init
    with tempfile.TemporaryDirectory(prefix="lumiere-init-") as d:
        init = resolve_model(init_from, Path(d))
        check_init(kind, init, cfg)
        staged = storage.join(output, "init", run_name)
        storage.upload_dir(init, staged, options, replace=True)
    return staged


def _ray_storage(output: str, output_dir: Path | None, options: storage.StorageOptions) -> dict:
    """RunConfig's storage, OUTPUT/ray: a local directory, or on S3 the path inside the bucket with pyarrow's S3
    filesystem built from the driver's settings (Ray Train pickles it to its controller and every worker, which
    upload checkpoints and restore them from there)."""
    if output_dir is not None:
        return {"storage_path": str(output_dir / "ray")}
    fs, path = storage.resolve(storage.join(output, "ray"), options)
    return {"storage_path": path, "storage_filesystem": fs}


def _publish_s3(checkpoint, kind: str, output: str, run_name: str, tracking_uri: str, run_id: str,
                options: storage.StorageOptions) -> tuple[str, dict, str]:
    """The final checkpoint of an s3:// run: a local copy (Ray downloads it) is published as
    OUTPUT/checkpoints/<run>-step<N>-<id>/ with OUTPUT/checkpoints/latest pointing at it (lumiere.model_uri.publish:
    an atomic pointer, never a half-written `latest`), and registered in MLflow from the same local copy.
    Returns (the version's s3:// URI, its meta, the registered model URI)."""
    with checkpoint.as_directory() as d:
        _, meta = read_meta(d)
        version = f"{run_name}-step{int(meta['step']):07d}-{os.urandom(3).hex()}"
        uri = publish(d, output, version, options, step=int(meta["step"]), kind=kind, run_name=run_name)
        model_uri = register(kind, Path(d), tracking_uri, run_id)
    return uri, meta, model_uri


CANDIDATE, PRODUCTION = "candidate", "production"
_WORKER_GROUP_START_TIMEOUT_S = 60.0  # Ray Train V2's default wait for a worker group's resources, per attempt


def register(kind: str, checkpoint: Path, tracking_uri: str, run_id: str) -> str:
    """Log the checkpoint to the run under a path of its own and register it as a new version of
    `lumiere-<kind>` with the alias `candidate`. Each version's artifacts are immutable: a resumed run (the same
    MLflow run) that registers again logs under a new path, so earlier versions keep pointing at their own files.
    `lumiere models promote` moves `production` to a version; Serve and --init-from take models:/NAME@ALIAS."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    _, meta = read_meta(checkpoint)
    path = f"checkpoints/step{int(meta['step']):07d}-{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(3).hex()}"
    client.log_artifacts(run_id, str(checkpoint), artifact_path=path)
    name = f"lumiere-{kind}"
    if not _exists(client, name):
        client.create_registered_model(name, description=f"Lumiere {kind} checkpoints (lumiere train {kind})")
    source = f"{client.get_run(run_id).info.artifact_uri}/{path}"
    version = client.create_model_version(name, source=source, run_id=run_id,
                                          tags={"lumiere.step": str(meta["step"])})
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    client.set_terminated(run_id, "FINISHED")
    return f"models:/{name}@{CANDIDATE} (version {version.version})"


def promote(name: str, version: str, tracking_uri: str, alias: str = PRODUCTION) -> str:
    """Point `alias` (production by default) of registered model `name` at `version`; returns a line for the CLI.
    The version before is named in it, so a promotion can be undone with the same command."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        have = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise LumiereError(f"{name} has no version {version} in {tracking_uri} (versions: "
                           f"{', '.join(map(str, have)) or 'none'})") from None
    try:
        before = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        before = None
    client.set_registered_model_alias(name, alias, str(version))
    was = f" (was version {before})" if before is not None else ""
    return f"models:/{name}@{alias} -> version {version}{was}"


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False
