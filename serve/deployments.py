"""The model deployments: thin wrappers over `lumiere.pipeline`, composed by the ingress with handles.

- `TextEncoder`: prompts -> text features, with `@serve.batch` (many small requests share one forward pass).
- `Generator`: the STUNet sampler (`TextToVideo.generate`); a streaming method that yields progress events while
  sampling and then the frames.
- `Upsampler`: the SSR (`Upsampler.upsample`), same streaming protocol.
Model-side input errors (`LumiereError`) come back as an `error` event with the library's message.
"""

from __future__ import annotations

import asyncio
import resource
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from ray import serve

from lumiere.errors import LumiereError

from .models import ModelSpec, load_generator, load_text_encoder, load_upsampler


class _Cancelled(Exception):
    """Raised inside the sampler's step callback once the caller has gone: sampling stops at that step."""


class RunStats:
    """What a model replica has done (for operators, and for tests that must see a cancel stop the sampler):
    requests started, finished, cancelled, and sampling steps run."""

    def __init__(self):
        self.counts = {"started": 0, "finished": 0, "cancelled": 0, "steps": 0}

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


async def _stream(work: Callable[[Callable[[int, int], None]], dict], stats: RunStats) -> AsyncIterator[dict]:
    """Run `work(callback)` in a thread; yield {"type": "progress", "step", "steps"} events, then its result
    ({"type": "result", …, "inference_time_s", "peak_memory_mb"}) or {"type": "error", "message"} for a
    LumiereError. When the caller cancels the stream (a cancelled job, a timeout, a dead ingress), Serve cancels
    this generator: the thread's next step callback raises and sampling stops there."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    done = object()

    def put(event) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    def callback(i: int, n: int) -> None:
        if stop.is_set():
            raise _Cancelled(f"stopped at step {i} of {n}: the request was cancelled")
        stats.counts["steps"] += 1
        put({"type": "progress", "step": int(i), "steps": int(n)})

    def run():
        try:
            t0, peak0 = time.perf_counter(), _reset_peak_memory()
            result = work(callback)
            result.update(inference_time_s=time.perf_counter() - t0, peak_memory_mb=_peak_memory_mb(peak0))
            stats.counts["finished"] += 1
            put(result)
        except _Cancelled:
            stats.counts["cancelled"] += 1
        except LumiereError as e:
            put({"type": "error", "message": str(e)})
        except BaseException as e:  # noqa: BLE001 - reported to the job, the replica stays up
            put({"type": "crash", "message": f"{type(e).__name__}: {e}"})
        put(done)

    stats.counts["started"] += 1
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        while (event := await events.get()) is not done:
            yield event
    finally:
        stop.set()


def _reset_peak_memory() -> float:
    """Start a peak-memory measurement: on CUDA the allocator's peak is reset; on CPU the process's peak RSS
    so far is returned (a CPU job reports the replica's peak RSS, which only grows)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_memory_mb(rss0: float) -> float:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return max(rss0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


@serve.deployment(name="TextEncoder", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8})
class TextEncoderDeployment:
    def __init__(self, model: dict):
        self.encoder = load_text_encoder(ModelSpec(**model))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def encode(self, prompts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        context, pooled = self.encoder.encode_text(list(prompts))
        return [(context[i].cpu().numpy(), pooled[i].cpu().numpy()) for i in range(len(prompts))]


class _Precomputed:
    """Give `TextToVideo.generate` the text features the TextEncoder deployment computed for this call's prompts
    (the prompt, and the negative prompt when there is one): {prompt: (context, pooled)}."""

    def __init__(self, gen, features: dict[str, tuple[np.ndarray, np.ndarray]] | None):
        self.gen, self.features = gen, features

    def __enter__(self):
        if self.features:
            import torch

            from lumiere.diffusion import Conditioning

            device = self.gen.device
            table = {p: tuple(torch.from_numpy(np.array(a)) for a in f) for p, f in self.features.items()}
            fallback = self.gen.encode

            def encode(prompts: list[str]):
                if any(p not in table for p in prompts):
                    return fallback(prompts)
                return Conditioning(torch.stack([table[p][0] for p in prompts]).to(device),
                                    torch.stack([table[p][1] for p in prompts]).to(device))

            self.gen.encode = encode

    def __exit__(self, *exc):
        self.gen.__dict__.pop("encode", None)


@serve.deployment(name="Generator", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=1,
                  max_queued_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1})
class GeneratorDeployment:
    def __init__(self, model: dict):
        self.gen = load_generator(ModelSpec(**model))
        self.stats = RunStats()

    def run_stats(self) -> dict[str, int]:
        return self.stats.as_dict()

    def info(self) -> dict[str, Any]:
        g = self.gen
        return {"name": g.cfg.name, "frames": g.cfg.video.frames, "size": g.cfg.video.size, "fps": g.cfg.video.fps,
                "conditional": g.conditional, "temporal_factor": int(g.model.temporal_factor),
                "steps": g.cfg.sample.steps, "sampler": g.cfg.sample.sampler, "source": g.source}

    async def check_health(self) -> None:
        if self.gen.device.type == "cuda":  # a GPU that fell off the bus or hit an ECC error fails here
            import torch

            torch.cuda.synchronize(self.gen.device)

    async def run(self, request: dict[str, Any]) -> AsyncIterator[dict]:
        """request: `generate` keyword arguments plus `prompt` (or `prompts` and one `seed` per prompt: a batch of
        compatible jobs in one call) and `features` (from the TextEncoder, by prompt)."""
        request = dict(request)
        prompts = request.pop("prompts", None)
        batch = prompts is not None
        prompts = prompts if batch else [request.pop("prompt")]
        features = request.pop("features", None)

        def work(callback):
            with _Precomputed(self.gen, features):
                result = self.gen.generate(prompts, callback=callback, **request)
            out = {"type": "result", "fps": result.fps, "seed": result.seed, "notes": list(result.notes)}
            if batch:
                out["videos"] = list(result.videos)
            else:
                out["video"] = result.videos[0]
            return out

        async for event in _stream(work, self.stats):
            yield event


@serve.deployment(name="Upsampler", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=1,
                  max_queued_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1})
class UpsamplerDeployment:
    def __init__(self, model: dict):
        self.up = load_upsampler(ModelSpec(**model))
        self.stats = RunStats()

    def run_stats(self) -> dict[str, int]:
        return self.stats.as_dict()

    def info(self) -> dict[str, Any]:
        s = self.up.cfg
        return {"size": s.video.size * s.ssr.scale, "input_size": s.video.size, "source": self.up.source}

    async def run(self, request: dict[str, Any]) -> AsyncIterator[dict]:
        video, prompt = request["video"], request["prompt"]

        def work(callback):
            result = self.up.upsample(video[None], [prompt], steps=request.get("steps"), seed=request.get("seed", 0),
                                      callback=callback)
            return {"type": "result", "video": result.videos[0], "fps": result.fps, "notes": list(result.notes)}

        async for event in _stream(work, self.stats):
            yield event
