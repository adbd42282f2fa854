"""The ingress: an OpenAI-compatible Videos API (FastAPI on Ray Serve) over the model deployments.

A `POST` authenticates the key (its tenant owns the job), reads the body within the size limit as it streams in,
validates every field (a 4xx with the OpenAI error object for anything wrong; uploads probed before decoding,
decoding in a worker thread), stores the uploaded inputs in the artifact store and records a `queued` job in the
job store, then returns the `video` object. It does not run the job itself: every ingress replica runs a job
runner that claims queued jobs from the store (`JobStore.claim`), so a job survives the replica that took its
request. A runner heart-beats; when one dies, another replica's sweep re-queues its jobs (or fails them once they
used their attempts). A job runs: text features from the TextEncoder, sampling on the Generator (progress
streamed into the job; a cancel or a timeout stops it at the next step), optionally the SSR Upsampler, then the
mp4 / thumbnail / spritesheet go to the artifact store. Clients poll `GET /v1/videos/{id}`.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .artifacts import ArtifactStore
from .inputs import ApiError, VideoLimits, bad, data_url, decode_image, decode_video, read_body
from .jobs import IdempotencyConflict, Job, JobStore, LimitReached, request_hash
from .tenants import DEFAULT_TENANT, parse_keys, tenant_for_token
from .webhooks import check_url, deliver, parse_secrets

log = logging.getLogger("ray.serve")
STATIC = Path(__file__).parent / "static"
VARIANTS = {"video": ("video.mp4", "video/mp4"), "thumbnail": ("thumbnail.png", "image/png"),
            "spritesheet": ("spritesheet.png", "image/png")}
EXTRA_TASKS = ("stylize",)  # t2v with a style
INPUT_NAMES = {"image": "input-image", "video": "input-video", "mask": "input-mask"}  # artifacts of a job's inputs
_bad = bad


@dataclass
class Settings:
    model_name: str = "lumiere"
    db_url: str = "sqlite:///lumiere-serve/jobs.db"
    artifacts: str = "lumiere-serve/artifacts"
    api_keys: tuple[str, ...] = ()  # entries "KEY" or "KEY TENANT" (serve/tenants.py)
    no_auth: bool = False
    max_pending_jobs: int = 32  # queued + in_progress over all replicas and tenants; more -> 429
    max_active_jobs_per_tenant: int = 8  # queued + in_progress of one tenant; more -> 429 for that tenant only
    max_jobs_per_replica: int = 4  # sampler calls one ingress replica runs at once (the Generator queues the rest)
    max_batch_size: int = 4  # queued t2v jobs with the same settings share one sampler call (1: never batch)
    max_attempts: int = 2  # a job whose replica died is re-queued until it has been claimed this often
    job_timeout_s: float = 1800.0  # a job running longer is stopped and failed with code `timeout`
    claim_interval_s: float = 0.5  # how often an idle runner looks for queued jobs
    max_upload_bytes: int = 32 * 2**20
    max_prompt_chars: int = 2000
    max_input_frames: int = 512
    max_input_side: int = 2048
    max_input_decoded_mb: int = 1024  # an uploaded video's frames x h x w x 3, checked before decoding
    max_clip_multiple: int = 2  # allowed `seconds`: 1..N model clip lengths
    max_steps: int = 250
    default_steps: int | None = None
    styles_dir: str | None = None
    poll_after_ms: int = 500
    webhook_secrets: tuple[str, ...] = ()  # entries "TENANT SECRET": that tenant's requests may name a webhook_url
    webhook_allowed_hosts: tuple[str, ...] = ()  # hosts a webhook may target although they resolve to a private IP
    webhook_attempts: int = 3
    stale_after_s: float = 10.0  # a job whose replica stopped heart-beating this long ago is re-queued or failed
    extra: dict[str, Any] = field(default_factory=dict)


class Stopped(Exception):
    """The job is no longer this runner's (cancelled, timed out, or handed on): stop working on it."""


def error_response(status: int, message: str, param=None, code=None, type="invalid_request_error",
                   headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _text(body: dict, key: str, default=None) -> Any:
    v = body.get(key, default)
    if isinstance(v, bytes):
        raise _bad(f"{key} must be a text field, not a file", key)
    if isinstance(v, (dict, list)):
        raise _bad(f"{key} must be a string or a number, not {'an object' if isinstance(v, dict) else 'a list'}",
                   key)
    return v


def _number(body: dict, key: str, kind, lo, hi, default=None):
    v = _text(body, key)
    if v is None or v == "":
        return default
    try:
        if isinstance(v, bool):
            raise ValueError
        x = kind(v)
        if kind is int and float(v) != x:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise _bad(f"{key} must be {'an integer' if kind is int else 'a number'} in [{lo}, {hi}], got {v!r}",
                   key) from None
    if (isinstance(x, float) and not math.isfinite(x)) or not (lo <= x <= hi):
        raise _bad(f"{key} must be in [{lo}, {hi}], got {v!r}", key)
    return x


class Ingress:
    """Plain class; `serve/app.py` wraps it with `serve.deployment` + `serve.ingress`."""

    reason = "the server restarted or crashed while this job was running, and it had used its attempts; submit it again"

    def __init__(self, encoder, generator, upsampler, settings: dict):
        self.s = Settings(**settings)
        self.keys = parse_keys(self.s.api_keys)
        self.webhook_secrets = parse_secrets(self.s.webhook_secrets)
        self.encoder, self.generator, self.upsampler = encoder, generator, upsampler
        self.store = JobStore(self.s.db_url)
        self.artifacts = ArtifactStore(self.s.artifacts)
        self.limits = VideoLimits(self.s.max_input_frames, self.s.max_input_side, self.s.max_input_decoded_mb * 2**20)
        self.owner = f"ingress-{uuid.uuid4().hex[:12]}"
        self.started_at = int(time.time())
        self.store.heartbeat(self.owner)
        self._ended_by_sweep: list[str] = []
        self._sweep()
        self.running: dict[str, asyncio.Task] = {}
        _CURRENT["ingress"] = self
        self._info: dict | None = None
        self._background: list[asyncio.Task] = []
        self._webhooks: set[asyncio.Task] = set()  # in flight; held here so none is garbage-collected half-way
        self._wake: asyncio.Event | None = None
        from ray.serve.metrics import Counter

        self.jobs_counter = Counter("lumiere_video_jobs", description="Video jobs by final status and task",
                                    tag_keys=("status", "task"))
        try:  # Serve runs the constructor on the replica's event loop: start the runner now, not on a first request
            self._ensure_background()
        except RuntimeError:  # no running loop here: check_health (Serve calls it every few seconds) starts it
            pass

    # --- background: heartbeat + sweep, and the job runner ----------------------------------------------------
    def _sweep(self) -> dict:
        counts = self.store.sweep(reason=self.reason, stale_after_s=self.s.stale_after_s,
                                  max_attempts=self.s.max_attempts, timeout_s=self.s.job_timeout_s, alive=self.owner)
        if any(counts.values()):
            log.warning("job sweep: %s", {k: v for k, v in counts.items() if k != "ended"})
        # the jobs this sweep failed are this replica's to report (their webhooks): housekeeping sends them
        self._ended_by_sweep.extend(counts["ended"])
        return counts

    def _ensure_background(self) -> None:
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        if not self._background or any(t.done() for t in self._background):
            for t in self._background:
                t.cancel()
            self._background = [loop.create_task(self._housekeeping()), loop.create_task(self._runner())]

    async def check_health(self) -> None:
        """Serve's health check: the background tasks run (restarted if they died) and the job store answers."""
        self._ensure_background()
        await asyncio.to_thread(self.store.count_active, "__health__")

    async def _housekeeping(self):
        while True:
            try:
                await asyncio.to_thread(self.store.heartbeat, self.owner)
                if (await asyncio.to_thread(self._sweep))["requeued"]:
                    self._wake.set()
                while self._ended_by_sweep:
                    self.notify_later(self._ended_by_sweep.pop())
            except Exception:  # noqa: BLE001 - the DB may blip; try again next round
                log.exception("job store housekeeping failed")
            await asyncio.sleep(max(0.5, self.s.stale_after_s / 4))

    async def _runner(self):
        loop = asyncio.get_running_loop()
        while True:
            try:
                while len(self.running) < self.s.max_jobs_per_replica:
                    jobs = await asyncio.to_thread(self.store.claim_batch, self.owner, max(1, self.s.max_batch_size))
                    if not jobs:
                        break
                    task = loop.create_task(self._execute(jobs))
                    for job in jobs:
                        self.running[job.id] = task
            except Exception:  # noqa: BLE001 - the DB may blip; try again next round
                log.exception("claiming jobs failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.s.claim_interval_s)
            except TimeoutError:
                pass  # nothing woke it: look for queued jobs again (another replica may have queued some)

    def __del__(self):  # a replica shut down cleanly (downscale, redeploy) hands its running jobs to the others
        try:
            for t in self.running.values():
                t.cancel()
            self.store.release(self.owner)
        except Exception:  # noqa: BLE001 - best effort: the sweep covers what this misses
            pass

    async def info(self) -> dict:
        if self._info is None:
            info = await self.generator.info.remote()
            info["ssr_size"] = (await self.upsampler.info.remote())["size"] if self.upsampler else None
            f, fps = info["frames"], info["fps"]
            info["seconds"] = {f"{f * m / fps:g}": f * m for m in range(1, self.s.max_clip_multiple + 1)}
            info["sizes"] = [f"{info['size']}x{info['size']}"] + (
                [f"{info['ssr_size']}x{info['ssr_size']}"] if info["ssr_size"] else [])
            self._info = info
        return self._info

    # --- auth: a key's tenant -----------------------------------------------------------------------------
    def tenant(self, request: Request) -> str:
        if self.s.no_auth:
            return DEFAULT_TENANT
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing API key: send it as 'Authorization: Bearer <key>'", None,
                           "invalid_api_key", "invalid_request_error")
        tenant = tenant_for_token(token.strip(), self.keys)
        if tenant is None:
            raise ApiError(401, "incorrect API key provided", None, "invalid_api_key", "invalid_request_error")
        return tenant

    # --- building a job from a request ---------------------------------------------------------------------
    async def _video_bytes(self, ref: Any, param: str, tenant: str) -> bytes:
        if isinstance(ref, bytes):
            return ref
        if isinstance(ref, dict):
            ref = ref.get("id")
            if not isinstance(ref, str) or not ref:
                raise _bad(f"{param} as an object must be {{\"id\": \"video_…\"}}", param, "invalid_reference")
        if isinstance(ref, str) and ref.startswith("data:"):
            return data_url(ref, param)
        if isinstance(ref, str) and ref:
            return await self._completed_video(ref, param, tenant)
        raise _bad(f"{param} must be an uploaded mp4 or a reference {{\"id\": \"video_…\"}} to a completed "
                   f"video{'' if ref is None else f', not {type(ref).__name__}'}", param,
                   "missing_required_parameter" if ref is None else "invalid_value")

    async def _completed_video(self, video_id: str, param: str, tenant: str) -> bytes:
        job = await asyncio.to_thread(self.store.get, video_id, tenant)
        if job is None:
            raise ApiError(404, f"no video with id {video_id!r} ({param})", param, "video_not_found")
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status}; only a completed video can be used", param,
                           "video_not_ready")
        data = await asyncio.to_thread(self.artifacts.get, video_id, "video.mp4")
        if data is None:
            raise ApiError(404, f"the content of video {video_id} is gone", param, "video_not_found")
        return data

    @staticmethod
    def _image_bytes(ref: Any, param: str) -> bytes:
        if isinstance(ref, dict):
            ref = ref.get("image_url") or ref.get("url")
            if not isinstance(ref, str):
                raise _bad(f"{param} must be an uploaded image or {{\"image_url\": \"data:…\"}}", param,
                           "invalid_reference")
        data = data_url(ref, param) if isinstance(ref, str) else ref
        if not isinstance(data, bytes):
            raise _bad(f"{param} must be an uploaded image, a data: URL or {{\"image_url\": \"data:…\"}}; got "
                       f"{type(ref).__name__}", param, "invalid_reference")
        return data

    @staticmethod
    def _mask_bytes(ref: Any) -> bytes:
        data = data_url(ref, "mask") if isinstance(ref, str) else ref
        if not isinstance(data, bytes):
            raise _bad(f"mask must be an uploaded image (white = region) or an mp4 of masks, not "
                       f"{type(ref).__name__}", "mask")
        return data

    def decode_input(self, name: str, data: bytes) -> np.ndarray:
        """A job input's bytes -> pixels (blocking: run in a thread). image: (h w 3); video: (t h w 3); mask: (h w)
        or (t h w)."""
        if name == "image":
            image = decode_image(data, "input_reference")
            if max(image.shape[:2]) > self.s.max_input_side:
                raise _bad(f"the input_reference is {image.shape[1]}x{image.shape[0]}; at most "
                           f"{self.s.max_input_side} pixels a side", "input_reference", "invalid_image")
            return image
        if name == "video":
            return decode_video(data, "video", self.limits)
        if data[4:8] == b"ftyp":  # an mp4: one mask per frame
            return decode_video(data, "mask", self.limits).mean(axis=-1).round().astype(np.uint8)
        return decode_image(data, "mask", mode="L")

    async def build(self, body: dict, *, endpoint: str, tenant: str,
                    source_id: str | None = None) -> tuple[dict, dict, dict[str, bytes]]:
        """Validate a request -> (job columns, the run spec (JSON), input bytes by name). Raises ApiError (4xx)."""
        from lumiere.pipeline import CONDITIONAL_TASKS, NEEDS, TASKS

        info = await self.info()
        prompt = _text(body, "prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _bad("prompt is required: describe the video", "prompt", "missing_required_parameter")
        if len(prompt) > self.s.max_prompt_chars:
            raise _bad(f"prompt is {len(prompt)} characters; at most {self.s.max_prompt_chars}", "prompt",
                       "string_above_max_length")
        negative = _text(body, "negative_prompt")
        if negative is not None and not isinstance(negative, str):
            raise _bad("negative_prompt must be a string", "negative_prompt")
        if negative and len(negative) > self.s.max_prompt_chars:
            raise _bad(f"negative_prompt is {len(negative)} characters; at most {self.s.max_prompt_chars}",
                       "negative_prompt", "string_above_max_length")
        model = _text(body, "model") or self.s.model_name
        if model != self.s.model_name:
            raise ApiError(400, f"unknown model {model!r}; this server serves {self.s.model_name!r}", "model",
                           "model_not_found")
        # length: `seconds` (OpenAI) or `num_frames` (SGLang Diffusion / FastVideo / vLLM-Omni), the same lengths
        allowed_frames = list(info["seconds"].values())
        num_frames = _number(body, "num_frames", int, 1, 10**6)
        given_seconds = _text(body, "seconds")
        key = None
        if num_frames is not None:
            key = next((k for k, n in info["seconds"].items() if n == num_frames), None)
            if key is None:
                raise _bad(f"num_frames {num_frames} is not supported; allowed values: "
                           f"{', '.join(map(str, allowed_frames))}", "num_frames", "invalid_num_frames")
        if given_seconds not in (None, ""):
            skey = next((k for k in info["seconds"] if _same_number(k, str(given_seconds))), None)
            if skey is None:
                raise _bad(f"seconds {str(given_seconds)!r} is not supported; allowed values: "
                           f"{', '.join(info['seconds'])} ({info['frames']} frames at {info['fps']:g} fps per clip)",
                           "seconds", "invalid_seconds")
            if key is not None and skey != key:
                raise _bad(f"seconds {given_seconds} and num_frames {num_frames} disagree ({key} s is "
                           f"{num_frames} frames); send one of them", "num_frames", "conflicting_parameters")
            key = skey
        key = key or next(iter(info["seconds"]))
        seconds = key
        fps = _number(body, "fps", float, 1.0, 120.0)
        size = str(_text(body, "size") or info["sizes"][0])
        if size not in info["sizes"]:
            raise _bad(f"size {size!r} is not supported; allowed values: {', '.join(info['sizes'])}"
                       + ("" if info["ssr_size"] else " (start the server with --ssr-checkpoint for more)"),
                       "size", "invalid_size")
        default_task = {"edits": "v2v", "extensions": "extend", "remix": "v2v"}.get(endpoint, "t2v")
        if endpoint == "create" and body.get("input_reference") not in (None, ""):
            default_task = "i2v"
        task = _text(body, "task") or default_task
        if task not in TASKS + EXTRA_TASKS:
            raise _bad(f"unknown task {task!r}; choose one of {', '.join(TASKS + EXTRA_TASKS)}", "task",
                       "invalid_task")
        allowed_here = {"edits": ("v2v", "inpaint", "stylize"), "extensions": ("extend",), "remix": ("v2v",)}
        if endpoint in allowed_here and task not in allowed_here[endpoint]:
            raise _bad(f"task {task!r} is not an {endpoint} task; use one of {', '.join(allowed_here[endpoint])}",
                       "task", "invalid_task")
        lib_task = "t2v" if task == "stylize" else task
        if task == "stylize" and endpoint == "edits":
            lib_task = "v2v"
        if lib_task in CONDITIONAL_TASKS and not info["conditional"]:
            raise _bad(f"task {task} needs a conditional model; this server's model ({info['source']}) is not one",
                       "task", "unsupported_task")
        run: dict[str, Any] = {"task": lib_task}
        # inputs: their bytes are kept with the job (whichever replica runs it decodes them again)
        image_ref = body.get("input_reference", body.get("image"))
        image_ref = None if image_ref == "" else image_ref
        video_ref = body.get("video")
        video_ref = source_id if source_id else (None if video_ref == "" else video_ref)
        mask_ref = None if body.get("mask") in (None, "") else body.get("mask")
        needs = NEEDS[lib_task]
        param_of = {"image": "input_reference", "video": "video", "mask": "mask"}
        given = {"image": image_ref is not None, "video": video_ref is not None, "mask": mask_ref is not None}
        for k in needs:
            if not given[k]:
                raise _bad(f"task {task} needs {param_of[k]}", param_of[k], "missing_required_parameter")
        for k, v in given.items():
            if v and k not in needs:
                raise _bad(f"task {task} does not take {param_of[k]}; tasks that do: "
                           + ", ".join(t for t in TASKS if k in NEEDS[t]), param_of[k], "unexpected_parameter")
        frames = info["seconds"][key]
        inputs: dict[str, bytes] = {}
        if "image" in needs:
            inputs["image"] = self._image_bytes(image_ref, "input_reference")
        if "video" in needs:
            inputs["video"] = await self._video_bytes(video_ref, "video", tenant)
        if "mask" in needs:
            inputs["mask"] = self._mask_bytes(mask_ref)
        decoded = {k: await asyncio.to_thread(self.decode_input, k, v) for k, v in inputs.items()}
        if "video" in decoded and lib_task != "extend" and len(decoded["video"]) < frames:
            raise _bad(f"the video has {len(decoded['video'])} frames; {seconds} s needs at least {frames}",
                       "video", "invalid_video")
        if "mask" in decoded:
            mask = decoded["mask"]
            like = decoded["image"] if "image" in needs else decoded["video"][0]
            if mask.shape[-2:] != like.shape[:2]:
                raise _bad(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but its "
                           f"{'image' if 'image' in needs else 'video'} is {like.shape[1]}x{like.shape[0]}; they "
                           "must be the same size", "mask", "invalid_mask")
            if mask.ndim == 3 and lib_task != "inpaint":
                raise _bad("a video mask is for inpaint; cinemagraph takes one mask image", "mask", "invalid_mask")
            if mask.ndim == 3 and len(mask) < frames:
                raise _bad(f"the mask video has {len(mask)} frames; the clip has {frames}", "mask", "invalid_mask")
        # sampling options
        seed = _number(body, "seed", int, 0, 2**31 - 1)
        run["seed"] = random.randrange(2**31) if seed is None else seed
        run["steps"] = _number(body, "num_inference_steps", int, 1, self.s.max_steps, self.s.default_steps)
        run["guidance_scale"] = _number(body, "guidance_scale", float, 0.0, 50.0)
        if negative:
            run["negative_prompt"] = negative
        strength = _number(body, "strength", float, 0.0, 1.0)
        if strength is not None:
            if lib_task != "v2v":
                raise _bad(f"strength applies to v2v edits (SDEdit), not task {task}", "strength",
                           "unexpected_parameter")
            if strength <= 0:
                raise _bad("strength must be in (0, 1]", "strength")
            run["strength"] = strength
        style = _text(body, "style")
        if task == "stylize" and not style:
            raise _bad("task stylize needs style (the name of a style under the server's styles directory)",
                       "style", "missing_required_parameter")
        if style:
            self._style_path(style)
            run["style"] = style
            run["style_strength"] = _number(body, "style_strength", float, 0.0, 1.0, 1.0)
        out_fps = fps or info["fps"]
        if lib_task == "extend":
            k = max(1, info["frames"] // 4)
            new_per_round = info["frames"] - k
            run["rounds"] = math.ceil(frames / new_per_round)
            total = len(decoded["video"]) + run["rounds"] * new_per_round
        else:
            run["frames"] = frames
            total = frames
        seconds_out = f"{total / out_fps:g}"
        webhook = _text(body, "webhook_url")
        if webhook not in (None, ""):
            if not isinstance(webhook, str):
                raise _bad("webhook_url must be a URL string", "webhook_url")
            if tenant not in self.webhook_secrets:
                raise _bad("webhooks are not configured for this API key's tenant (the server needs a signing "
                           "secret for it: webhook_secrets / LUMIERE_WEBHOOK_SECRETS)", "webhook_url",
                           "webhooks_not_configured")
            problem = await asyncio.to_thread(check_url, webhook, tuple(self.s.webhook_allowed_hosts))
            if problem:
                raise _bad(f"webhook_url {problem}", "webhook_url", "invalid_webhook_url")
            run["webhook_url"] = webhook
        run["fps"] = fps
        run["upsample"] = size != info["sizes"][0]
        run["prompt"] = prompt
        run["inputs"] = sorted(inputs)
        columns = {"model": model, "prompt": prompt, "seconds": seconds_out, "size": size, "task": task}
        return columns, run, inputs

    def _style_path(self, style: str) -> str:
        root = Path(self.s.styles_dir).resolve() if self.s.styles_dir else None
        available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root and root.is_dir() else []
        if not available:
            raise _bad("this server has no styles (start it with a styles directory)", "style", "invalid_style")
        if style not in available:
            raise _bad(f"unknown style {style!r}; available: {', '.join(available)}", "style", "invalid_style")
        return str(root / style)

    # --- accepting a job ---------------------------------------------------------------------------------------
    async def submit(self, request: Request, endpoint: str, source_id: str | None = None,
                     defaults: dict | None = None) -> tuple[Job, bool]:
        """Authenticate, read, validate, store inputs, create -> (job, created). With an `Idempotency-Key` header
        a retry of the same request returns the job the first one made (created False)."""
        self._ensure_background()
        tenant = self.tenant(request)
        body, _ = await read_body(request, self.s.max_upload_bytes)
        if endpoint == "remix":
            if body.get("video") not in (None, ""):
                raise _bad("remix takes the video from the path; do not send video", "video",
                           "unexpected_parameter")
            source = await self.get_job(source_id, tenant)
            # a remix is the source video re-imagined: its length and size unless the request says otherwise
            body = {"seconds": source.seconds, "size": source.size,
                    **{k: v for k, v in body.items() if v not in (None, "")}}
        idem = request.headers.get("idempotency-key")
        if idem is not None and not 1 <= len(idem) <= 255:
            raise _bad("the Idempotency-Key header must be 1-255 characters", None, "invalid_idempotency_key")
        fingerprint = request_hash({"endpoint": endpoint, "source": source_id, **body}) if idem else None
        if idem:  # a retry: answer before validating again (its inputs may no longer be needed)
            earlier = await asyncio.to_thread(self.store.by_idempotency_key, tenant, idem)
            if earlier is not None:
                return self._retry_of(earlier, fingerprint)
        columns, run, inputs = await self.build(body, endpoint=endpoint, tenant=tenant, source_id=source_id)
        params = {k: run.get(k) for k in ("seed", "steps", "guidance_scale", "strength", "style_strength", "style",
                                          "negative_prompt", "upsample", "webhook_url")}
        params.update(num_frames=run.get("frames"), run=run)
        job_id = f"video_{uuid.uuid4().hex}"
        for name, data in inputs.items():  # before the job exists: a runner never sees a job without its inputs
            await asyncio.to_thread(self.artifacts.put, job_id, INPUT_NAMES[name], data)
        try:
            job, created = await asyncio.to_thread(
                self.store.create, job_id=job_id, params=params, tenant=tenant, batch_key=self._batch_key(run),
                remixed_from_video_id=source_id if endpoint == "remix" else None, idempotency_key=idem,
                request_hash=fingerprint, max_active=self.s.max_pending_jobs,
                max_active_per_tenant=self.s.max_active_jobs_per_tenant, **columns)
        except LimitReached as e:
            if inputs:
                await asyncio.to_thread(self.artifacts.delete_job, job_id)
            if e.scope == "tenant":
                raise ApiError(429, f"this API key's tenant has {e.active} jobs queued or running, at most {e.limit}; "
                               "retry when one finishes", None, "tenant_limit_reached", "rate_limit_exceeded",
                               headers={"Retry-After": "5"}) from None
            raise ApiError(429, f"the queue is full ({e.active} jobs queued or running, at most {e.limit}); retry "
                           "later", None, "queue_full", "rate_limit_exceeded", headers={"Retry-After": "5"}) from None
        except IdempotencyConflict as e:
            raise self._conflict(e.job) from None
        if not created and inputs:
            await asyncio.to_thread(self.artifacts.delete_job, job_id)
        if created:
            self._wake.set()
        return job, created

    def _batch_key(self, run: dict) -> str | None:
        """Jobs with equal keys can share one sampler call: text-to-video with the same length, steps, guidance and
        output fps, no inputs, style, negative prompt or upsampling, and a deterministic sampler (so a job's video
        does not depend on what it was batched with)."""
        if self.s.max_batch_size <= 1 or run["task"] != "t2v" or run.get("inputs") or run.get("style") \
                or run.get("negative_prompt") or run.get("upsample") or (self._info or {}).get("sampler") == "ddpm":
            return None
        return json.dumps({k: run.get(k) for k in ("task", "frames", "steps", "guidance_scale", "fps")},
                          sort_keys=True)

    def _retry_of(self, earlier: Job, fingerprint: str | None) -> tuple[Job, bool]:
        if earlier.request_hash not in (None, fingerprint):
            raise self._conflict(earlier)
        return earlier, False

    @staticmethod
    def _conflict(job: Job) -> ApiError:
        return ApiError(409, f"this Idempotency-Key was used for a different request (video {job.id}); use a new "
                        "key for a new request", None, "idempotency_key_reused")

    # --- running a job ---------------------------------------------------------------------------------------
    async def _stream(self, handle, request: dict, progress, usage: dict) -> dict:
        result = None
        gen = handle.options(stream=True).run.remote(request)
        try:
            async for event in gen:
                if event["type"] == "progress":
                    await progress(event["step"], event["steps"])
                elif event["type"] == "result":
                    result = event
                elif event["type"] == "error":
                    raise ApiError(400, event["message"], None, "invalid_request")
                else:
                    raise RuntimeError(event["message"])
        except BaseException:
            gen.cancel()  # the deployment stops sampling at its next step (it checks between steps)
            raise
        if result is None:
            raise RuntimeError("the model deployment ended without a result")
        usage["inference_time_s"] = usage.get("inference_time_s", 0.0) + float(result.get("inference_time_s", 0.0))
        usage["peak_memory_mb"] = max(usage.get("peak_memory_mb", 0.0), float(result.get("peak_memory_mb", 0.0)))
        return result

    async def _execute(self, jobs: list[Job]) -> None:
        """Run one job, or a batch of compatible ones in one sampler call; each ends completed or failed on its own
        (a batch member that is cancelled meanwhile stays cancelled while the others finish)."""
        statuses = {job.id: "failed" for job in jobs}
        started = min(job.started_at or time.time() for job in jobs)
        budget = self.s.job_timeout_s - (time.time() - started)

        async def fail_all(code: str, message: str):
            for job in jobs:
                await asyncio.to_thread(self.store.fail, job.id, code, message, self.owner)

        try:
            statuses = await asyncio.wait_for(self._run(jobs), timeout=max(1.0, budget))
        except Stopped:
            statuses = dict.fromkeys(statuses, "stopped")
        except TimeoutError:
            await fail_all("timeout", f"the job ran longer than {self.s.job_timeout_s:g} s and was stopped")
        except ApiError as e:
            await fail_all(e.code or "invalid_request", e.message)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the job fails with a reason, the server stays up
            log.exception("job(s) %s failed", [j.id for j in jobs])
            code = "server_busy" if type(e).__name__ == "BackPressureError" else "internal_error"
            await fail_all(code, f"{type(e).__name__}: {str(e)[:500]}")
        finally:
            for job in jobs:
                self.running.pop(job.id, None)
                self.jobs_counter.inc(tags={"status": statuses.get(job.id, "failed"), "task": job.task})
                if job.params.get("webhook_url"):
                    self.notify_later(job.id)
            if self._wake is not None:
                self._wake.set()

    def notify_later(self, job_id: str) -> None:
        """Send the job's webhook in the background (`_notify`)."""
        task = asyncio.get_running_loop().create_task(self._notify(job_id))
        self._webhooks.add(task)
        task.add_done_callback(self._webhooks.discard)

    async def _notify(self, job_id: str) -> None:
        """The job's webhook, once it has ended (completed, failed, cancelled, timed out); the outcome is recorded
        on the job. A job handed to another replica is that replica's to report."""
        try:
            job = await asyncio.to_thread(self.store.get, job_id)
            if job is None or job.status not in ("completed", "failed") or job.params.get("webhook"):
                return
            outcome = await asyncio.to_thread(deliver, job.params["webhook_url"], self.webhook_secrets[job.tenant],
                                              job.to_openai(), attempts=self.s.webhook_attempts)
            await asyncio.to_thread(self.store.update, job_id, params={**job.params, "webhook": outcome})
        except Exception:  # noqa: BLE001 - a webhook never takes the runner down
            log.exception("webhook for job %s failed", job_id)

    def _load_inputs(self, job: Job) -> dict[str, np.ndarray]:
        run = job.params["run"]
        out = {}
        for name in run.get("inputs", []):
            data = self.artifacts.get(job.id, INPUT_NAMES[name])
            if data is None:
                raise ApiError(410, f"the {name} uploaded with this job is gone from the artifact store", None,
                               "input_missing")
            out[name] = self.decode_input(name, data)
        return out

    async def _run(self, jobs: list[Job]) -> dict[str, str]:
        """-> {job id: "completed" | "stopped"}. One job, or a batch (same batch key: t2v with the same settings,
        no inputs), which the Generator samples in one call with each job's own seed and prompt."""
        job = jobs[0]
        run = dict(job.params["run"])
        live = {j.id for j in jobs}  # the jobs this runner still holds
        last = [0.0, -1]

        async def progress(fraction: float):
            pct = min(99, int(fraction * 100))
            now = time.monotonic()
            if pct != last[1] and (now - last[0] > 0.25 or pct >= 99):
                last[0], last[1] = now, pct
                for j in list(live):
                    if not await asyncio.to_thread(self.store.set_progress, j, pct, self.owner):
                        live.discard(j)  # cancelled, timed out or handed to another replica
                if not live:
                    raise Stopped(job.id)  # nobody wants the result: stop sampling

        await progress(0.0)
        run.update(await asyncio.to_thread(self._load_inputs, job))
        if run.get("style"):
            run["style"] = self._style_path(run["style"])
        notes: list[str] = []
        usage: dict[str, float] = {}
        prompts = [j.params["run"]["prompt"] for j in jobs]
        run.pop("prompt")
        negative = run.pop("negative_prompt", None)
        features = {}
        for text in dict.fromkeys(prompts + ([negative] if negative else [])):
            features[text] = await self.encoder.encode.remote(text)
        rounds = run.pop("rounds", 1)
        upsample = run.pop("upsample")
        out_fps = run.pop("fps", None)
        run.pop("inputs", None)
        run.pop("webhook_url", None)
        stages = rounds + (1 if upsample else 0)
        base = {k: v for k, v in run.items() if v is not None}
        base.update(features=features, negative_prompt=negative)
        if len(jobs) > 1:
            base.update(prompts=prompts, seed=[j.params["run"]["seed"] for j in jobs])
        else:
            base["prompt"] = prompts[0]
        videos = [base.get("video")]
        for r in range(rounds):
            if videos[0] is not None:
                base["video"] = videos[0]

            def stage_progress(i, n, r=r):
                return progress((r + i / max(n, 1)) / stages)

            result = await self._stream(self.generator, base, stage_progress, usage)
            videos, notes = result["videos"] if len(jobs) > 1 else [result["video"]], notes + result["notes"]
        fps = result["fps"]
        if upsample:  # never batched (batch keys exclude it)
            result = await self._stream(
                self.upsampler, {"video": videos[0], "prompt": prompts[0], "steps": run.get("steps"),
                                 "seed": run["seed"]},
                lambda i, n: progress((rounds + i / max(n, 1)) / stages), usage)
            videos, notes = [result["video"]], notes + result["notes"]
        fps = out_fps or fps
        statuses = {}
        for j, video in zip(jobs, videos, strict=True):
            if j.id not in live:
                statuses[j.id] = "stopped"
                continue
            await asyncio.to_thread(self._write_outputs, j.id, video, fps)
            params = {k: v for k, v in j.params.items() if k != "run"}
            params.update(notes=notes, frames=int(len(video)), num_frames=int(len(video)), fps=fps,
                          inference_time_s=round(usage.get("inference_time_s", 0.0), 3),
                          peak_memory_mb=round(usage.get("peak_memory_mb", 0.0), 1), run=j.params["run"],
                          batch_size=len(jobs))
            if await asyncio.to_thread(self.store.complete, j.id, params, self.owner):
                statuses[j.id] = "completed"
            else:  # cancelled or timed out at the last moment: it stays that way
                statuses[j.id] = "stopped"
                if await asyncio.to_thread(self.store.get, j.id) is None:  # deleted meanwhile: drop what we wrote
                    await asyncio.to_thread(self.artifacts.delete_job, j.id)
        return statuses

    def _write_outputs(self, job_id: str, video: np.ndarray, fps: float) -> None:
        from PIL import Image

        from lumiere.video import encode_mp4_bytes, spritesheet

        def png(image: np.ndarray) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
            return buf.getvalue()

        self.artifacts.put(job_id, "thumbnail.png", png(video[0]))
        self.artifacts.put(job_id, "spritesheet.png", png(spritesheet(video)))
        self.artifacts.put(job_id, "video.mp4", encode_mp4_bytes(video, fps))  # last: its presence = complete

    async def get_job(self, video_id: str, tenant: str) -> Job:
        job = await asyncio.to_thread(self.store.get, video_id, tenant)
        if job is None:  # another tenant's video is indistinguishable from none
            raise ApiError(404, f"no video with id {video_id!r}", "video_id", "video_not_found")
        return job


def _same_number(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    except ValueError:
        return False


def create_fastapi() -> FastAPI:
    """The FastAPI app; its routes find the replica's `Ingress` in `_CURRENT`."""
    app = FastAPI(title="Lumiere Videos API", version="1",
                  description="OpenAI-compatible Videos API (`client.videos.*`) for Lumiere on Ray Serve.")

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.param, e.code, e.type, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", []) if x not in ("body", "query", "path")]
        return error_response(400, f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}",
                              loc[-1] if loc else None, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}", None, code)

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(e).__name__}", None, "internal_error", "server_error")

    return app


app = create_fastapi()


_CURRENT: dict[str, Ingress] = {}  # the replica's Ingress (one per replica process)


def _ingress(request: Request) -> Ingress:
    ing = _CURRENT.get("ingress")
    if ing is None:
        raise ApiError(503, "the server is starting", None, "starting", "server_error")
    return ing


@app.get("/", include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text())


@app.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """Healthy or not, and nothing else (no key needed, so it says nothing about the model or the stores)."""
    ing = _CURRENT.get("ingress")
    try:
        if ing is None:
            raise RuntimeError("starting")
        await asyncio.to_thread(ing.store.count_active, "__health__")
    except Exception:  # noqa: BLE001 - unhealthy: the store or the replica is not ready
        return JSONResponse({"status": "unhealthy"}, status_code=503)
    return JSONResponse({"status": "ok"})


@app.get("/v1/info")
async def server_info(request: Request) -> dict:
    """What this server generates (for clients and the web page): model, source, sizes, seconds, frame counts,
    fps, the caller's tenant and its active jobs against the limit."""
    ing = _ingress(request)
    tenant = ing.tenant(request)
    info = await ing.info()
    active = await asyncio.to_thread(ing.store.count_active, tenant)
    return {"model": ing.s.model_name, "source": info["source"], "sizes": info["sizes"],
            "seconds": list(info["seconds"]), "num_frames": list(info["seconds"].values()), "fps": info["fps"],
            "tenant": tenant, "active_jobs": active, "max_active_jobs": ing.s.max_active_jobs_per_tenant,
            "max_steps": ing.s.max_steps, "auth": not ing.s.no_auth}


def _model_object(ing: Ingress) -> dict:
    # created: when this server loaded the model (the OpenAI field is a Unix time; a checkpoint has no better one
    # that every model source shares)
    return {"id": ing.s.model_name, "object": "model", "created": ing.started_at, "owned_by": "lumiere"}


@app.get("/v1/models")
async def models(request: Request) -> dict:
    ing = _ingress(request)
    ing.tenant(request)
    return {"object": "list", "data": [_model_object(ing)]}


@app.get("/v1/models/{model_id}")
async def retrieve_model(model_id: str, request: Request) -> dict:
    ing = _ingress(request)
    ing.tenant(request)
    if model_id != ing.s.model_name:
        raise ApiError(404, f"model {model_id!r} not found; this server serves {ing.s.model_name!r}", "model",
                       "model_not_found")
    return _model_object(ing)


def _accepted(job: Job, created: bool) -> JSONResponse:
    return JSONResponse(job.to_openai(), headers={} if created else {"Idempotent-Replayed": "true"})


@app.post("/v1/videos")
async def create_video(request: Request) -> JSONResponse:
    return _accepted(*await _ingress(request).submit(request, "create"))


@app.post("/v1/videos/edits")
async def edit_video(request: Request) -> JSONResponse:
    return _accepted(*await _ingress(request).submit(request, "edits"))


@app.post("/v1/videos/extensions")
async def extend_video(request: Request) -> JSONResponse:
    return _accepted(*await _ingress(request).submit(request, "extensions"))


@app.post("/v1/videos/{video_id}/remix")
async def remix_video(video_id: str, request: Request) -> JSONResponse:
    return _accepted(*await _ingress(request).submit(request, "remix", source_id=video_id))


@app.get("/v1/videos")
async def list_videos(request: Request, after: str | None = None, limit: int = 20, order: str = "desc") -> dict:
    ing = _ingress(request)
    tenant = ing.tenant(request)
    if not 1 <= limit <= 100:
        raise _bad(f"limit must be in [1, 100], got {limit}", "limit")
    if order not in ("asc", "desc"):
        raise _bad(f"order must be asc or desc, got {order!r}", "order")
    if after is not None and await asyncio.to_thread(ing.store.get, after, tenant) is None:
        raise _bad(f"after={after!r} is not a video id of this server; pass the last_id of the previous page",
                   "after", "invalid_cursor")
    jobs, has_more = await asyncio.to_thread(ing.store.list, tenant=tenant, after=after, limit=limit, order=order)
    data = [j.to_openai() for j in jobs]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


@app.get("/v1/videos/{video_id}")
async def retrieve_video(video_id: str, request: Request) -> JSONResponse:
    ing = _ingress(request)
    job = await ing.get_job(video_id, ing.tenant(request))
    return JSONResponse(job.to_openai(), headers={"openai-poll-after-ms": str(ing.s.poll_after_ms)})


@app.post("/v1/videos/{video_id}/cancel")
async def cancel_video(video_id: str, request: Request) -> JSONResponse:
    """Stop an active job: it ends `failed` with code `cancelled`, and its sampling stops at the next step
    (whichever replica runs it). A job already finished is returned as it is."""
    ing = _ingress(request)
    tenant = ing.tenant(request)
    await ing.get_job(video_id, tenant)
    job, was_queued = await asyncio.to_thread(ing.store.cancel_and_tell, video_id, tenant)
    if job is None:
        raise ApiError(404, f"no video with id {video_id!r}", "video_id", "video_not_found")
    if was_queued and job.params.get("webhook_url"):
        # no runner held it, so none will report its end: this request does (in the background, with retries)
        ing.notify_later(job.id)
    return JSONResponse(job.to_openai())


@app.delete("/v1/videos/{video_id}")
async def delete_video(video_id: str, request: Request) -> dict:
    """Delete a video; an active one is cancelled first (its sampling stops at the next step)."""
    ing = _ingress(request)
    tenant = ing.tenant(request)
    job = await ing.get_job(video_id, tenant)
    if job.status in ("queued", "in_progress"):
        await asyncio.to_thread(ing.store.cancel, video_id, tenant)
    await asyncio.to_thread(ing.store.delete, video_id, tenant)
    await asyncio.to_thread(ing.artifacts.delete_job, video_id)
    return {"id": video_id, "object": "video.deleted", "deleted": True}


@app.get("/v1/videos/{video_id}/content")
async def video_content(video_id: str, request: Request, variant: str = "video") -> Response:
    ing = _ingress(request)
    tenant = ing.tenant(request)
    if variant not in VARIANTS:
        raise _bad(f"variant {variant!r} is not one of {', '.join(VARIANTS)}", "variant", "invalid_variant")
    job = await ing.get_job(video_id, tenant)
    if job.status != "completed":
        raise ApiError(409, f"video {video_id} is {job.status}; content is available once it is completed",
                       "video_id", "video_not_ready")
    name, media = VARIANTS[variant]
    data = await asyncio.to_thread(ing.artifacts.get, video_id, name)
    if data is None:
        raise ApiError(404, f"the {variant} of video {video_id} is missing from the artifact store", "video_id",
                       "content_not_found")
    return Response(data, media_type=media, headers={"Content-Disposition": f'inline; filename="{video_id}-{name}"'})
