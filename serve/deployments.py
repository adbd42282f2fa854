"""The model deployments: thin wrappers over `lumiere.pipeline`, composed by the ingress with handles.

- `TextEncoder`: prompts -> text features, with `@serve.batch` (many small requests share one forward pass).
- `Generator`: the STUNet sampler (`TextToVideo.generate`); a streaming method that yields progress events while
  sampling and then the frames.
- `Upsampler`: the SSR (`Upsampler.upsample`), same streaming protocol.
Model-side input errors (`LumiereError`) come back as an `error` event with the library's message.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from ray import serve

from lumiere.errors import LumiereError

from .models import ModelSpec, load_generator, load_text_encoder, load_upsampler


def _stream(work: Callable[[Callable[[int, int], None]], dict]) -> Iterator[dict]:
    """Run `work(callback)` in a thread; yield {"type": "progress", "step", "steps"} events, then its result
    ({"type": "result", …}) or {"type": "error", "message"} for a LumiereError."""
    events: queue.Queue = queue.Queue()
    done = object()

    def run():
        try:
            events.put(work(lambda i, n: events.put({"type": "progress", "step": int(i), "steps": int(n)})))
        except LumiereError as e:
            events.put({"type": "error", "message": str(e)})
        except BaseException as e:  # noqa: BLE001 - reported to the job, the replica stays up
            events.put({"type": "crash", "message": f"{type(e).__name__}: {e}"})
        events.put(done)

    threading.Thread(target=run, daemon=True).start()
    while (event := events.get()) is not done:
        yield event


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
    """Give `TextToVideo.generate` the text features the TextEncoder deployment computed (for this call)."""

    def __init__(self, gen, features: tuple[np.ndarray, np.ndarray] | None):
        self.gen, self.features = gen, features

    def __enter__(self):
        if self.features is not None:
            import torch

            from lumiere.diffusion import Conditioning

            context, pooled = (torch.from_numpy(np.array(a)) for a in self.features)
            device = self.gen.device
            self.gen.encode = lambda prompts: Conditioning(
                context[None].expand(len(prompts), *context.shape).to(device),
                pooled[None].expand(len(prompts), *pooled.shape).to(device))

    def __exit__(self, *exc):
        self.gen.__dict__.pop("encode", None)


@serve.deployment(name="Generator", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=1,
                  max_queued_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1})
class GeneratorDeployment:
    def __init__(self, model: dict):
        self.gen = load_generator(ModelSpec(**model))

    def info(self) -> dict[str, Any]:
        g = self.gen
        return {"name": g.cfg.name, "frames": g.cfg.video.frames, "size": g.cfg.video.size, "fps": g.cfg.video.fps,
                "conditional": g.conditional, "temporal_factor": int(g.model.temporal_factor),
                "steps": g.cfg.sample.steps, "source": g.source}

    def run(self, request: dict[str, Any]) -> Iterator[dict]:
        """request: `generate` keyword arguments plus `prompt` and `features` (from the TextEncoder)."""
        request = dict(request)
        prompt, features = request.pop("prompt"), request.pop("features", None)

        def work(callback):
            with _Precomputed(self.gen, features):
                result = self.gen.generate([prompt], callback=callback, **request)
            return {"type": "result", "video": result.videos[0], "fps": result.fps, "seed": result.seed,
                    "notes": list(result.notes)}

        yield from _stream(work)


@serve.deployment(name="Upsampler", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=1,
                  max_queued_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1})
class UpsamplerDeployment:
    def __init__(self, model: dict):
        self.up = load_upsampler(ModelSpec(**model))

    def info(self) -> dict[str, Any]:
        s = self.up.cfg
        return {"size": s.video.size * s.ssr.scale, "input_size": s.video.size, "source": self.up.source}

    def run(self, request: dict[str, Any]) -> Iterator[dict]:
        video, prompt = request["video"], request["prompt"]

        def work(callback):
            result = self.up.upsample(video[None], [prompt], steps=request.get("steps"), seed=request.get("seed", 0),
                                      callback=callback)
            return {"type": "result", "video": result.videos[0], "fps": result.fps, "notes": list(result.notes)}

        yield from _stream(work)
