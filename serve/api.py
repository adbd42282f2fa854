"""The ingress: an OpenAI-compatible Videos API (FastAPI on Ray Serve) over the model deployments.

A `POST` validates its inputs (a 4xx with the OpenAI error object for anything wrong), records a `queued` job in
the job store and returns the `video` object; the job then runs in this replica: text features from the
TextEncoder, sampling on the Generator (progress streamed into the job), optionally the SSR Upsampler, and the
mp4 / thumbnail / spritesheet written to the artifact store. Clients poll `GET /v1/videos/{id}`.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
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
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .artifacts import ArtifactStore
from .jobs import Job, JobStore

log = logging.getLogger("ray.serve")
STATIC = Path(__file__).parent / "static"
VARIANTS = {"video": ("video.mp4", "video/mp4"), "thumbnail": ("thumbnail.png", "image/png"),
            "spritesheet": ("spritesheet.png", "image/png")}
EXTRA_TASKS = ("stylize",)  # t2v with a style


@dataclass
class Settings:
    model_name: str = "lumiere"
    db_url: str = "sqlite:///lumiere-serve/jobs.db"
    artifacts: str = "lumiere-serve/artifacts"
    api_keys: tuple[str, ...] = ()
    no_auth: bool = False
    max_pending_jobs: int = 32  # queued + in_progress over all replicas; more -> 429
    max_upload_bytes: int = 32 * 2**20
    max_prompt_chars: int = 2000
    max_input_frames: int = 512
    max_input_side: int = 2048
    max_clip_multiple: int = 2  # allowed `seconds`: 1..N model clip lengths
    max_steps: int = 250
    default_steps: int | None = None
    styles_dir: str | None = None
    poll_after_ms: int = 500
    stale_after_s: float = 10.0  # a job whose replica stopped heart-beating this long ago is failed
    extra: dict[str, Any] = field(default_factory=dict)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def error_response(status: int, message: str, param=None, code=None, type="invalid_request_error",
                   headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _bad(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


# --- request bodies -------------------------------------------------------------------------------------------
async def read_body(request: Request, max_bytes: int) -> dict[str, Any]:
    """Multipart form (what the SDK sends), urlencoded form or JSON -> {field: str | bytes | dict}. Form keys
    like `video[id]` become nested dicts; uploaded files become bytes."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise ApiError(413, f"the request is {int(length)} bytes; at most {max_bytes} bytes are accepted",
                       None, "request_too_large")
    ctype = request.headers.get("content-type", "")
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        try:
            form = await request.form(max_part_size=max_bytes)
        except Exception as e:  # noqa: BLE001 - malformed multipart
            raise _bad(f"the form body does not parse: {e}", None, "invalid_body") from None
        out: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                value = await value.read()
                if len(value) > max_bytes:
                    raise ApiError(413, f"upload {key!r} exceeds {max_bytes} bytes", key, "request_too_large")
            if "[" in key and key.endswith("]"):
                outer, inner = key[:-1].split("[", 1)
                if not isinstance(out.get(outer), dict):
                    out[outer] = {}
                out[outer][inner] = value
            else:
                out[key] = value
        return out
    raw = await request.body()
    if len(raw) > max_bytes:
        raise ApiError(413, f"the request exceeds {max_bytes} bytes", None, "request_too_large")
    if not raw.strip():
        return {}
    import json

    try:
        body = json.loads(raw)
    except ValueError as e:
        raise _bad(f"the body is neither multipart/form-data nor valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad("the JSON body must be an object", None, "invalid_json")
    return body


def _data_url(value: str, param: str) -> bytes:
    if not value.startswith("data:") or ";base64," not in value:
        raise _bad(f"{param} must be an uploaded file or a data: URL (base64); remote URLs are not fetched",
                   param, "invalid_reference")
    try:
        return base64.b64decode(value.split(";base64,", 1)[1], validate=True)
    except ValueError:
        raise _bad(f"{param} is not valid base64", param, "invalid_reference") from None


def _text(body: dict, key: str, default=None) -> Any:
    v = body.get(key, default)
    if isinstance(v, bytes):
        raise _bad(f"{key} must be a text field, not a file", key)
    return v


def _number(body: dict, key: str, kind, lo, hi, default=None):
    v = _text(body, key)
    if v is None or v == "":
        return default
    try:
        x = kind(v)
        if kind is int and float(v) != x:
            raise ValueError
    except (TypeError, ValueError):
        raise _bad(f"{key} must be {'an integer' if kind is int else 'a number'} in [{lo}, {hi}], got {v!r}",
                   key) from None
    if not (lo <= x <= hi) or (isinstance(x, float) and not math.isfinite(x)):
        raise _bad(f"{key} must be in [{lo}, {hi}], got {v!r}", key)
    return x


def decode_image(data: bytes, param: str, mode: str = "RGB") -> np.ndarray:
    from lumiere.video import read_image

    try:
        return read_image(data, what=param, mode=mode)
    except ValueError as e:
        raise _bad(str(e), param, "invalid_image") from None


def decode_video(data: bytes, param: str) -> np.ndarray:
    from lumiere.video import decode_mp4_bytes

    try:
        frames = decode_mp4_bytes(data)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the upload's fault
        raise _bad(f"the {param} does not decode as a video (mp4/H.264): {str(e).splitlines()[0][:200]}", param,
                   "invalid_video") from None
    if frames.ndim != 4 or len(frames) == 0:
        raise _bad(f"the {param} has no frames", param, "invalid_video")
    return frames


class Ingress:
    """Plain class; `serve/app.py` wraps it with `serve.deployment` + `serve.ingress`."""

    def __init__(self, encoder, generator, upsampler, settings: dict):
        self.s = Settings(**settings)
        self.encoder, self.generator, self.upsampler = encoder, generator, upsampler
        self.store = JobStore(self.s.db_url)
        self.artifacts = ArtifactStore(self.s.artifacts)
        self.owner = f"ingress-{uuid.uuid4().hex[:12]}"
        self.started_at = int(time.time())
        self.store.heartbeat(self.owner)
        n = self.store.fail_interrupted(self.reason, self.s.stale_after_s, alive=self.owner)
        if n:
            log.warning("marked %d interrupted job(s) failed", n)
        self.tasks: dict[str, asyncio.Task] = {}
        _CURRENT["ingress"] = self
        self._info: dict | None = None
        self._sweeper: asyncio.Task | None = None
        from ray.serve.metrics import Counter

        self.jobs_counter = Counter("lumiere_video_jobs", description="Video jobs by final status and task",
                                    tag_keys=("status", "task"))

    reason = "the server restarted or crashed while this job was queued or running; submit it again"

    async def _housekeeping(self):
        while True:
            try:
                await asyncio.to_thread(self.store.heartbeat, self.owner)
                await asyncio.to_thread(self.store.fail_interrupted, self.reason, self.s.stale_after_s, self.owner)
            except Exception:  # noqa: BLE001 - the DB may blip; try again next round
                log.exception("job store housekeeping failed")
            await asyncio.sleep(max(1.0, self.s.stale_after_s / 4))

    def _ensure_sweeper(self):
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._housekeeping())

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

    # --- auth ---------------------------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.s.no_auth:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing API key: send it as 'Authorization: Bearer <key>'", None,
                           "invalid_api_key", "invalid_request_error")
        token_b = token.strip().encode()
        ok = False
        for key in self.s.api_keys:  # constant time per key, and every key compared
            ok |= hmac.compare_digest(token_b, key.encode())
        if not ok:
            raise ApiError(401, "incorrect API key provided", None, "invalid_api_key", "invalid_request_error")

    # --- building a job from a request ---------------------------------------------------------------------
    async def _source_video(self, ref: Any, param: str) -> np.ndarray:
        if isinstance(ref, bytes):
            frames = decode_video(ref, param)
        elif isinstance(ref, dict) and ref.get("id"):
            frames = await self._completed_video(str(ref["id"]), param)
        elif isinstance(ref, str) and ref.startswith("data:"):
            frames = decode_video(_data_url(ref, param), param)
        elif isinstance(ref, str) and ref:
            frames = await self._completed_video(ref, param)
        else:
            raise _bad(f"{param} must be an uploaded mp4 or a reference {{\"id\": \"video_…\"}} to a completed "
                       "video", param, "missing_required_parameter" if ref is None else "invalid_value")
        if len(frames) > self.s.max_input_frames:
            raise _bad(f"the {param} has {len(frames)} frames; at most {self.s.max_input_frames}", param,
                       "invalid_video")
        if max(frames.shape[1:3]) > self.s.max_input_side:
            raise _bad(f"the {param} is {frames.shape[2]}x{frames.shape[1]}; at most {self.s.max_input_side} "
                       "pixels a side", param, "invalid_video")
        return frames

    async def _completed_video(self, video_id: str, param: str) -> np.ndarray:
        job = await asyncio.to_thread(self.store.get, video_id)
        if job is None:
            raise ApiError(404, f"no video with id {video_id!r} ({param})", param, "video_not_found")
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status}; only a completed video can be used", param,
                           "video_not_ready")
        data = await asyncio.to_thread(self.artifacts.get, video_id, "video.mp4")
        if data is None:
            raise ApiError(404, f"the content of video {video_id} is gone", param, "video_not_found")
        return decode_video(data, param)

    def _image(self, ref: Any, param: str) -> np.ndarray:
        if isinstance(ref, dict):
            ref = ref.get("image_url") or ref.get("url")
            if not isinstance(ref, str):
                raise _bad(f"{param} must be an uploaded image or {{\"image_url\": \"data:…\"}}", param,
                           "invalid_reference")
        data = _data_url(ref, param) if isinstance(ref, str) else ref
        if not isinstance(data, bytes):
            raise _bad(f"{param} must be an uploaded image, a data: URL or {{\"image_url\": \"data:…\"}}; got "
                       f"{type(ref).__name__}", param, "invalid_reference")
        image = decode_image(data, param)
        if max(image.shape[:2]) > self.s.max_input_side:
            raise _bad(f"the {param} is {image.shape[1]}x{image.shape[0]}; at most {self.s.max_input_side} pixels "
                       "a side", param, "invalid_image")
        return image

    def _mask(self, ref: Any) -> np.ndarray:
        data = _data_url(ref, "mask") if isinstance(ref, str) else ref
        if not isinstance(data, bytes):
            raise _bad("mask must be an uploaded image (white = region) or an mp4 of masks", "mask")
        if data[4:8] == b"ftyp":  # an mp4: one mask per frame
            frames = decode_video(data, "mask")
            return frames.mean(axis=-1).round().astype(np.uint8)
        return decode_image(data, "mask", mode="L")

    async def build(self, body: dict, *, endpoint: str, source_id: str | None = None) -> tuple[dict, dict]:
        """Validate a request -> (job columns, run arguments with decoded inputs). Raises ApiError (4xx)."""
        from lumiere.pipeline import CONDITIONAL_TASKS, NEEDS, TASKS

        info = await self.info()
        prompt = _text(body, "prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _bad("prompt is required: describe the video", "prompt", "missing_required_parameter")
        if len(prompt) > self.s.max_prompt_chars:
            raise _bad(f"prompt is {len(prompt)} characters; at most {self.s.max_prompt_chars}", "prompt",
                       "string_above_max_length")
        model = _text(body, "model") or self.s.model_name
        if model != self.s.model_name:
            raise ApiError(400, f"unknown model {model!r}; this server serves {self.s.model_name!r}", "model",
                           "model_not_found")
        seconds = str(_text(body, "seconds") or next(iter(info["seconds"])))
        key = next((k for k in info["seconds"] if _same_number(k, seconds)), None)
        if key is None:
            raise _bad(f"seconds {seconds!r} is not supported; allowed values: {', '.join(info['seconds'])} "
                       f"({info['frames']} frames at {info['fps']:g} fps per clip)", "seconds", "invalid_seconds")
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
        # inputs
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
        if "image" in needs:
            run["image"] = self._image(image_ref, "input_reference")
        if "video" in needs:
            run["video"] = await self._source_video(video_ref, "video")
            if lib_task != "extend" and len(run["video"]) < frames:
                raise _bad(f"the video has {len(run['video'])} frames; {seconds} s needs at least {frames}",
                           "video", "invalid_video")
        if "mask" in needs:
            mask = self._mask(mask_ref)
            like = run["image"] if "image" in needs else run["video"][0]
            if mask.shape[-2:] != like.shape[:2]:
                raise _bad(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but its "
                           f"{'image' if 'image' in needs else 'video'} is {like.shape[1]}x{like.shape[0]}; they "
                           "must be the same size", "mask", "invalid_mask")
            if mask.ndim == 3 and lib_task != "inpaint":
                raise _bad("a video mask is for inpaint; cinemagraph takes one mask image", "mask", "invalid_mask")
            if mask.ndim == 3 and len(mask) < frames:
                raise _bad(f"the mask video has {len(mask)} frames; the clip has {frames}", "mask", "invalid_mask")
            run["mask"] = mask
        # sampling options
        seed = _number(body, "seed", int, 0, 2**31 - 1)
        run["seed"] = random.randrange(2**31) if seed is None else seed
        run["steps"] = _number(body, "num_inference_steps", int, 1, self.s.max_steps, self.s.default_steps)
        run["guidance_scale"] = _number(body, "guidance_scale", float, 0.0, 50.0)
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
            run["style"] = self._style_path(style)
            run["style_strength"] = _number(body, "style_strength", float, 0.0, 1.0, 1.0)
        if lib_task == "extend":
            k = max(1, info["frames"] // 4)
            new_per_round = info["frames"] - k
            run["rounds"] = math.ceil(frames / new_per_round)
            total = len(run["video"]) + run["rounds"] * new_per_round
            seconds_out = f"{total / info['fps']:g}"
        else:
            run["frames"] = frames
            seconds_out = key
        run["upsample"] = size != info["sizes"][0]
        run["prompt"] = prompt
        columns = {"model": model, "prompt": prompt, "seconds": seconds_out, "size": size, "task": task}
        return columns, run

    def _style_path(self, style: str) -> str:
        root = Path(self.s.styles_dir).resolve() if self.s.styles_dir else None
        available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root and root.is_dir() else []
        if not available:
            raise _bad("this server has no styles (start it with a styles directory)", "style", "invalid_style")
        if style not in available:
            raise _bad(f"unknown style {style!r}; available: {', '.join(available)}", "style", "invalid_style")
        return str(root / style)

    # --- running a job ---------------------------------------------------------------------------------------
    async def submit(self, body: dict, endpoint: str, source_id: str | None = None) -> Job:
        self._ensure_sweeper()
        columns, run = await self.build(body, endpoint=endpoint, source_id=source_id)
        active = await asyncio.to_thread(self.store.count_active)
        if active >= self.s.max_pending_jobs:
            raise ApiError(429, f"the queue is full ({active} jobs queued or running, at most "
                           f"{self.s.max_pending_jobs}); retry later", None, "queue_full", "rate_limit_exceeded",
                           headers={"Retry-After": "5"})
        params = {k: run.get(k) for k in ("seed", "steps", "guidance_scale", "strength", "style_strength")}
        params.update(style=Path(run["style"]).name if run.get("style") else None, upsample=run["upsample"])
        job = await asyncio.to_thread(self.store.create, params=params, owner=self.owner,
                                      remixed_from_video_id=source_id if endpoint == "remix" else None, **columns)
        self.tasks[job.id] = asyncio.get_running_loop().create_task(self._run(job, run))
        return job

    async def _stream(self, handle, request: dict, progress) -> dict:
        result = None
        async for event in handle.options(stream=True).run.remote(request):
            if event["type"] == "progress":
                await progress(event["step"], event["steps"])
            elif event["type"] == "result":
                result = event
            elif event["type"] == "error":
                raise ApiError(400, event["message"], None, "invalid_request")
            else:
                raise RuntimeError(event["message"])
        if result is None:
            raise RuntimeError("the model deployment ended without a result")
        return result

    async def _run(self, job: Job, run: dict) -> None:
        last = [0.0, -1]

        async def progress(fraction: float):
            pct = min(99, int(fraction * 100))
            now = time.monotonic()
            if pct != last[1] and (now - last[0] > 0.25 or pct >= 99):
                last[0], last[1] = now, pct
                await asyncio.to_thread(self.store.set_progress, job.id, pct)

        status, notes = "failed", []
        try:
            await asyncio.to_thread(self.store.set_progress, job.id, 0)
            features = await self.encoder.encode.remote(run["prompt"])
            rounds = run.pop("rounds", 1)
            upsample = run.pop("upsample")
            stages = rounds + (1 if upsample else 0)
            base = {k: v for k, v in run.items() if v is not None}
            base["features"] = features
            video = base.get("video")
            for r in range(rounds):
                if video is not None:
                    base["video"] = video

                def stage_progress(i, n, r=r):
                    return progress((r + i / max(n, 1)) / stages)

                result = await self._stream(self.generator, base, stage_progress)
                video, notes = result["video"], notes + result["notes"]
            fps = result["fps"]
            if upsample:
                result = await self._stream(
                    self.upsampler, {"video": video, "prompt": run["prompt"], "steps": run.get("steps"),
                                     "seed": run["seed"]},
                    lambda i, n: progress((rounds + i / max(n, 1)) / stages))
                video, notes = result["video"], notes + result["notes"]
            await asyncio.to_thread(self._write_outputs, job.id, video, fps)
            params = dict(job.params, notes=notes, frames=int(len(video)), fps=fps)
            await asyncio.to_thread(self.store.complete, job.id, params)
            status = "completed"
        except ApiError as e:
            await asyncio.to_thread(self.store.fail, job.id, e.code or "invalid_request", e.message)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the job fails with a reason, the server stays up
            log.exception("job %s failed", job.id)
            code = "server_busy" if type(e).__name__ == "BackPressureError" else "internal_error"
            await asyncio.to_thread(self.store.fail, job.id, code, f"{type(e).__name__}: {str(e)[:500]}")
        finally:
            self.tasks.pop(job.id, None)
            self.jobs_counter.inc(tags={"status": status, "task": job.task})

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

    async def get_job(self, video_id: str) -> Job:
        job = await asyncio.to_thread(self.store.get, video_id)
        if job is None:
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
async def healthz(request: Request) -> dict:
    ing = _ingress(request)
    info = await ing.info()
    return {"status": "ok", "model": ing.s.model_name, "source": info["source"], "sizes": info["sizes"],
            "seconds": list(info["seconds"]), "auth": not ing.s.no_auth}


def _model_object(ing: Ingress) -> dict:
    # created: when this server loaded the model (the OpenAI field is a Unix time; a checkpoint has no better one
    # that every model source shares)
    return {"id": ing.s.model_name, "object": "model", "created": ing.started_at, "owned_by": "lumiere"}


@app.get("/v1/models")
async def models(request: Request) -> dict:
    ing = _ingress(request)
    ing.check_auth(request)
    return {"object": "list", "data": [_model_object(ing)]}


@app.get("/v1/models/{model_id}")
async def retrieve_model(model_id: str, request: Request) -> dict:
    ing = _ingress(request)
    ing.check_auth(request)
    if model_id != ing.s.model_name:
        raise ApiError(404, f"model {model_id!r} not found; this server serves {ing.s.model_name!r}", "model",
                       "model_not_found")
    return _model_object(ing)


@app.post("/v1/videos")
async def create_video(request: Request) -> JSONResponse:
    ing = _ingress(request)
    ing.check_auth(request)
    job = await ing.submit(await read_body(request, ing.s.max_upload_bytes), "create")
    return JSONResponse(job.to_openai())


@app.post("/v1/videos/edits")
async def edit_video(request: Request) -> JSONResponse:
    ing = _ingress(request)
    ing.check_auth(request)
    job = await ing.submit(await read_body(request, ing.s.max_upload_bytes), "edits")
    return JSONResponse(job.to_openai())


@app.post("/v1/videos/extensions")
async def extend_video(request: Request) -> JSONResponse:
    ing = _ingress(request)
    ing.check_auth(request)
    job = await ing.submit(await read_body(request, ing.s.max_upload_bytes), "extensions")
    return JSONResponse(job.to_openai())


@app.post("/v1/videos/{video_id}/remix")
async def remix_video(video_id: str, request: Request) -> JSONResponse:
    ing = _ingress(request)
    ing.check_auth(request)
    body = await read_body(request, ing.s.max_upload_bytes)
    if body.get("video") not in (None, ""):
        raise _bad("remix takes the video from the path; do not send video", "video", "unexpected_parameter")
    source = await ing.get_job(video_id)
    # a remix is the source video re-imagined: its length and size unless the request says otherwise
    body = {"seconds": source.seconds, "size": source.size, **{k: v for k, v in body.items() if v not in (None, "")}}
    job = await ing.submit(body, "remix", source_id=video_id)
    return JSONResponse(job.to_openai())


@app.get("/v1/videos")
async def list_videos(request: Request, after: str | None = None, limit: int = 20, order: str = "desc") -> dict:
    ing = _ingress(request)
    ing.check_auth(request)
    if not 1 <= limit <= 100:
        raise _bad(f"limit must be in [1, 100], got {limit}", "limit")
    if order not in ("asc", "desc"):
        raise _bad(f"order must be asc or desc, got {order!r}", "order")
    if after is not None and await asyncio.to_thread(ing.store.get, after) is None:
        raise _bad(f"after={after!r} is not a video id of this server; pass the last_id of the previous page",
                   "after", "invalid_cursor")
    jobs, has_more = await asyncio.to_thread(ing.store.list, after=after, limit=limit, order=order)
    data = [j.to_openai() for j in jobs]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


@app.get("/v1/videos/{video_id}")
async def retrieve_video(video_id: str, request: Request) -> JSONResponse:
    ing = _ingress(request)
    ing.check_auth(request)
    job = await ing.get_job(video_id)
    return JSONResponse(job.to_openai(), headers={"openai-poll-after-ms": str(ing.s.poll_after_ms)})


@app.delete("/v1/videos/{video_id}")
async def delete_video(video_id: str, request: Request) -> dict:
    ing = _ingress(request)
    ing.check_auth(request)
    job = await ing.get_job(video_id)
    if job.status in ("queued", "in_progress"):
        raise ApiError(409, f"video {video_id} is {job.status}; delete it once it is completed or failed",
                       "video_id", "video_not_finished")
    await asyncio.to_thread(ing.artifacts.delete_job, video_id)
    await asyncio.to_thread(ing.store.delete, video_id)
    return {"id": video_id, "object": "video.deleted", "deleted": True}


@app.get("/v1/videos/{video_id}/content")
async def video_content(video_id: str, request: Request, variant: str = "video") -> Response:
    ing = _ingress(request)
    ing.check_auth(request)
    if variant not in VARIANTS:
        raise _bad(f"variant {variant!r} is not one of {', '.join(VARIANTS)}", "variant", "invalid_variant")
    job = await ing.get_job(video_id)
    if job.status != "completed":
        raise ApiError(409, f"video {video_id} is {job.status}; content is available once it is completed",
                       "video_id", "video_not_ready")
    name, media = VARIANTS[variant]
    data = await asyncio.to_thread(ing.artifacts.get, video_id, name)
    if data is None:
        raise ApiError(404, f"the {variant} of video {video_id} is missing from the artifact store", "video_id",
                       "content_not_found")
    return Response(data, media_type=media, headers={"Content-Disposition": f'inline; filename="{video_id}-{name}"'})
