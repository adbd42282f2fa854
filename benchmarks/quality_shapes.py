"""Does the model learn motion? STUNet variants vs the fixed-temporal baseline on the moving-shapes vocabulary.

The paper's central claim, at small scale: temporal down/up-sampling in the U-Net (the STUNet) gives globally
coherent motion; the baseline of the same width/depth keeps every frame at every level
(`stunet.temporal_resampling=false`) and so costs more per step. Every model is trained with the same compute
from the same trained 2D prior, then scored automatically on generated videos. By default the two models are
the config's STUNet and its fixed-temporal baseline; `--variant NAME=key=value,...` (repeatable) trains any set
of variants instead, e.g. an ablation that changes one thing at a time.

    1. corpus: `make_corpus` (balanced over colour x shape x direction), decoded; captions embedded
    2. the 2D text-to-image prior, trained once (`--t2i-steps`), shared by both variants
    3. the inflated models (prior frozen unless a variant says otherwise), trained on whole clips with
       `lumiere.trainer.TrainStep` (the loop `lumiere train` runs on each worker), in-process, on the same batches
       in the same order:
         --minutes M  same compute: each trains until it has spent M minutes of training step time; a
                      side-by-side timing before training estimates the step count, which sets the length of
                      the LR schedule (so it decays to about the end)
         --steps N    same number of steps (the fixed variant then costs ~2x the compute)
       They train interleaved (whichever is behind its budget steps next), so machine load hits all alike.
    4. generate: every colour x direction, shapes in rotation, `--seeds` seeds each (EMA weights, the config's
       sampler, steps and guidance)
    5. score each video with `lumiere.shapes.analyse_clip` against its prompt:
         colour      the dominant foreground colour is the prompted one
         direction   the least-squares centroid motion points the prompted way (>= 1 px)
         both        colour and direction right
         on-track    share of frame-to-frame centroid steps that move the prompted way
         smoothness  mean |second difference| of the centroid track, px/frame^2 (0 = constant speed)
         area cv     coefficient of variation of the shape's area over the frames (0 = stable shape)
         no jumps    share of videos whose shape never moves more than `JUMP_PX` between two frames (a corpus
                     shape moves at most ~1.3 px per frame): a jump is the shape restarting its motion elsewhere
                     mid-clip, i.e. two halves of the clip that do not agree
       The real corpus clips are scored the same way as a reference (the scorer's ceiling).
    6. a loss probe (`direction_probe`): does the denoiser's loss on real clips depend on the direction word?
    7. a sampling trace (`sampling_trace`): the prompted travel of each sampling step's x0 prediction
    8. text separation: mean cosine between prompts that differ only in direction (or only in colour), as the
       frozen encoder's pooled embedding and as the STUNet's motion text path (`MotionConditioning.text`) see them

    python benchmarks/quality_shapes.py --minutes 8          # ~20 min on 2 cores: 1,000 t2i steps + 2 x 8 min + eval
    python benchmarks/quality_shapes.py --steps 300 --quick  # a quick check
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumiere.allocator import retain_freed_memory  # noqa: E402
from lumiere.checkpoint import build_prior, build_stunet  # noqa: E402
from lumiere.config import load_config  # noqa: E402
from lumiere.diffusion import Conditioning  # noqa: E402
from lumiere.pipeline import TextToVideo  # noqa: E402
from lumiere.shapes import COLORS, DIRECTIONS, SHAPES, analyse_clip, make_corpus, parse_caption  # noqa: E402
from lumiere.text_encoder import TextEncoder  # noqa: E402
from lumiere.trainer import TrainStep, clips_to_model, lr_lambda  # noqa: E402
from lumiere.video import read_video, save_png, spritesheet  # noqa: E402


class OracleDirectionEncoder(torch.nn.Module):
    """A diagnostic, not a model: the config's text encoder, with the prompt's direction written into its features
    as a one-hot code (added to the pooled embedding and to every token, at the features' own scale). Direction is
    then as distinct to the model as a feature can be, so a model that still does not follow it is limited by its
    motion layers or its budget, not by the text encoder (`--oracle-direction`)."""

    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder = encoder

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.encoder, name)

    def encode_text(self, prompts: list[str]):
        context, pooled = self.encoder.encode_text(prompts)
        code = torch.zeros(len(prompts), len(DIRECTIONS))
        for i, p in enumerate(prompts):
            try:
                code[i, list(DIRECTIONS).index(parse_caption(p)[0].direction)] = 1.0
            except (ValueError, IndexError):
                pass  # the null prompt and anything outside the vocabulary: no code
        scale_p, scale_c = pooled.norm(dim=-1, keepdim=True).mean(), context.norm(dim=-1, keepdim=True).mean()
        pooled = pooled.clone()
        pooled[:, :len(DIRECTIONS)] += code * scale_p
        context = context.clone()
        context[:, :, :len(DIRECTIONS)] += code[:, None, :] * scale_c
        return context, pooled


def with_steps(cfg, steps: int):
    # the LR schedule decays over this run's steps, not the config's default max_steps
    return cfg.model_copy(update={"train": replace(cfg.train, max_steps=steps)})


def load_corpus(corpus: Path, frames: int):
    clips, captions = [], []
    for line in (corpus / "captions.jsonl").read_text().splitlines():
        rec = json.loads(line)
        video, _ = read_video(corpus / rec["path"])
        clips.append(torch.from_numpy(video[:frames]))
        captions.append(rec["caption"])
    return torch.stack(clips), captions


MIRRORED = ({"left": "right", "right": "left"}, {"up": "down", "down": "up"})  # horizontal, vertical flip


def mirrored_caption(text: str, flip: int) -> str:
    """The caption of a clip flipped left-right (flip 1), top-bottom (2) or both (3): direction words swapped."""
    words = text.split(" ")
    for axis, swap in enumerate(MIRRORED):
        if flip & (1 << axis):
            words = [swap.get(w, w) for w in words]
    return " ".join(words)


class Trainer:
    """One model's TrainStep, fed batches from its own generator (same seed for both: the same batches).

    `flipped`: the text features of every caption mirrored (flip 1, 2, 3; see `mirrored_caption`): each clip of a
    batch is then flipped at random with its caption's direction words swapped to match (`--flip-augment`)."""

    def __init__(self, name, model, cfg, kind, clips, cond, steps, budget_s: float | None = None,
                 flipped: list[Conditioning] | None = None):
        self.name, self.model, self.cfg, self.kind = name, model, cfg, kind
        self.clips, self.cond, self.steps, self.budget_s = clips, cond, steps, budget_s
        self.variants = [cond, *flipped] if flipped else None
        self.step_fn = TrainStep(model, with_steps(cfg, steps), kind)
        self.gen = torch.Generator().manual_seed(cfg.train.seed)
        self.time_s, self.losses, self.log = 0.0, [], []

    def done(self) -> bool:
        if self.budget_s is not None:  # same compute: until this much step time is spent, whatever the step count
            return self.time_s >= self.budget_s
        return self.step_fn.step >= self.steps

    def progress(self) -> float:
        return self.time_s / self.budget_s if self.budget_s is not None else self.step_fn.step / self.steps

    def step(self) -> None:
        idx = torch.randint(0, len(self.clips), (self.cfg.train.batch_size,), generator=self.gen)
        batch, context, pooled = self.clips[idx], self.cond.context[idx], self.cond.pooled[idx]
        if self.variants is not None:  # clips n t h w c: flip 1 mirrors w, flip 2 mirrors h
            flips = torch.randint(0, 4, (len(idx),), generator=self.gen)
            batch = torch.stack([c.flip(dims=[d for d, bit in ((2, 1), (1, 2)) if f & bit]) if f else c
                                 for c, f in zip(batch, flips.tolist(), strict=True)])
            context = torch.stack([self.variants[f].context[i] for i, f in zip(idx.tolist(), flips.tolist(),
                                                                              strict=True)])
            pooled = torch.stack([self.variants[f].pooled[i] for i, f in zip(idx.tolist(), flips.tolist(),
                                                                            strict=True)])
        if self.budget_s is not None and self.time_s > 0:
            self._fit_lr_schedule_to_budget()
        t0 = time.perf_counter()
        metrics = self.step_fn(clips_to_model(batch), Conditioning(context, pooled))
        self.time_s += time.perf_counter() - t0
        self.losses.append(metrics["loss"])
        s = self.step_fn.step
        every = max(1, self.steps // 10)
        if s % every == 0 or s == self.steps:
            window = self.losses[-every:]
            line = (f"  {self.name:<14} step {s:>5}/{self.steps}  loss {sum(window) / len(window):.4f}  "
                    f"{s / self.time_s:.2f} steps/s  train time {self.time_s / 60:.1f} min")
            print(line, flush=True)
            self.log.append({"step": s, "loss": sum(window) / len(window), "time_s": self.time_s})

    def _fit_lr_schedule_to_budget(self) -> None:
        """--minutes: the LR schedule ends where the time budget does. Its length was set from a timing before
        training; when the machine's speed drifts, a run either stopped mid-decay (run W: planned 2,353 steps, ran
        2,127, LR still ~half the peak) or went on past the schedule's end. So before every step the schedule's
        length is the step count this run's average pace so far projects for the whole budget."""
        t = self.cfg.train
        total = max(self.step_fn.step + 1, round(self.step_fn.step * self.budget_s / self.time_s))
        self.steps = total
        self.step_fn.lr_schedule.lr_lambdas = [lr_lambda(t.warmup_steps, total, t.lr_schedule, t.lr_decay_fraction)]

    def ema_model(self):
        ema = copy.deepcopy(self.model).eval()
        ema.load_state_dict(self.step_fn.ema.state_dict(self.model))
        return ema


def step_time(model, cfg, kind, clips, cond, n: int = 4) -> float:
    """Median seconds per training step of a throwaway copy (after one warm-up step)."""
    tr = Trainer("timing", copy.deepcopy(model), cfg, kind, clips, cond, n + 1)
    times = []
    for _ in range(n + 1):
        t0 = time.perf_counter()
        tr.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """'NAME=key=value,key=value' -> {NAME: [key=value, ...]}; none given: the STUNet and its fixed baseline."""
    if not specs:
        specs = ["STUNet=", "fixed-temporal=stunet.temporal_resampling=false"]
    out = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        if not name or name in out:
            raise SystemExit(f"--variant {spec!r}: give each variant a unique NAME before the first '='")
        out[name] = [kv for kv in rest.split(",") if kv]
    return out


def text_separation(model, encoder) -> dict:
    """Mean cosine between what the motion layers get of two prompts that differ only in direction / only in
    colour (1 = indistinguishable): the frozen encoder's pooled embedding, and the STUNet's motion text path."""
    pairs = {"direction": [], "colour": []}
    colors, dirs = list(COLORS), list(DIRECTIONS)
    for shape in SHAPES:
        for c in colors:
            for i, d1 in enumerate(dirs):
                for d2 in dirs[i + 1:]:
                    pairs["direction"].append((f"a {c} {shape} moving {d1}", f"a {c} {shape} moving {d2}"))
        for d in dirs:
            for i, c1 in enumerate(colors):
                for c2 in colors[i + 1:]:
                    pairs["colour"].append((f"a {c1} {shape} moving {d}", f"a {c2} {shape} moving {d}"))
    out = {}
    for kind, ps in pairs.items():
        ctx_a, pooled_a = encoder.encode_text([a for a, _ in ps])
        ctx_b, pooled_b = encoder.encode_text([b for _, b in ps])
        out[f"encoder_{kind}_cos"] = float(torch.cosine_similarity(pooled_a, pooled_b).mean())
        if getattr(model, "motion", None) is not None:
            with torch.no_grad():
                ea, _ = model.motion.text(ctx_a, pooled_a)
                eb, _ = model.motion.text(ctx_b, pooled_b)
            out[f"motion_{kind}_cos"] = float(torch.cosine_similarity(ea, eb).mean())
    return out


@torch.no_grad()
def direction_probe(model, encoder, cfg, clips, captions, n: int = 24, levels=(0.5, 0.7, 0.9),
                    extra_levels=(0.97,)) -> dict:
    """Does the model use the prompted direction at all? Cheaper and earlier than its samples: for `n`
    single-shape corpus clips, the v-prediction loss with the caption as given vs with each other direction
    word, on the same noise at the same high noise levels (`levels` of the training timesteps, where a clip's
    motion is decided). `probe_direction_by_loss`: share of clips whose true caption has the lowest loss of the
    four (chance 25 %); `probe_wrong_direction_loss_gap`: mean relative loss increase of a wrong direction (0: the
    direction word makes no difference to the denoiser); `probe_gap_by_level`: that gap at each level alone,
    `extra_levels` included (they do not enter the two numbers above)."""
    from lumiere.diffusion import training_scheduler

    scheduler = training_scheduler(cfg.diffusion)
    model = model.eval()
    dirs = list(DIRECTIONS)
    picked = [i for i, c in enumerate(captions) if " and " not in c][:n]
    gen = torch.Generator().manual_seed(1234)  # the same noise for every model and step
    all_levels = (*levels, *extra_levels)
    wins, gaps, level_gaps = 0, [], []
    confusion = [[0] * len(dirs) for _ in dirs]  # [true][lowest-loss] direction
    for i in picked:
        true_dir = parse_caption(captions[i])[0].direction
        prompts = [captions[i].replace(f"moving {true_dir}", f"moving {d}") for d in dirs]
        ctx, pooled = encoder.encode_text(prompts)
        x0 = clips_to_model(clips[i:i + 1])
        L = len(all_levels)
        noise = torch.randn((L, *x0.shape[1:]), generator=gen)
        t = torch.tensor([int(lv * (scheduler.config.num_train_timesteps - 1)) for lv in all_levels])
        xt = scheduler.add_noise(x0.expand(L, *x0.shape[1:]), noise, t)
        target = (scheduler.get_velocity(x0.expand(L, *x0.shape[1:]), noise, t)
                  if scheduler.config.prediction_type == "v_prediction" else noise)
        # every direction's prompt at every level: one batch of 4 L
        pred = model(xt.repeat(len(dirs), 1, 1, 1, 1), t.repeat(len(dirs)), ctx.repeat_interleave(L, 0),
                     pooled.repeat_interleave(L, 0))
        losses = ((pred.float() - target.repeat(len(dirs), 1, 1, 1, 1)) ** 2).flatten(1).mean(1)
        by_level = losses.view(len(dirs), L)
        per_dir = by_level[:, :len(levels)].mean(1)
        k = dirs.index(true_dir)
        others = torch.cat([by_level[:k], by_level[k + 1:]]).mean(0)
        level_gaps.append(((others - by_level[k]) / by_level[k]).tolist())
        wins += int(per_dir.argmin() == k)
        confusion[k][int(per_dir.argmin())] += 1
        wrong = torch.cat([per_dir[:k], per_dir[k + 1:]])
        gaps.append(float((wrong.mean() - per_dir[k]) / per_dir[k]))
    return {"probe_direction_by_loss": wins / max(1, len(picked)),
            "probe_wrong_direction_loss_gap": float(np.mean(gaps)) if gaps else math.nan,
            "probe_confusion": {d: dict(zip(dirs, row, strict=True)) for d, row in zip(dirs, confusion, strict=True)},
            "probe_gap_by_level": dict(zip(all_levels, np.mean(level_gaps, axis=0).tolist(), strict=True))
            if level_gaps else {}}


def _travel(video: torch.Tensor, direction: str) -> float:
    """Travel (px) along `direction` over the clip of a (c t h w) video's bright part: the least-squares slope
    of the centroid of what is brighter than each frame's median, times the clip length. Made for means (of
    clips or of predictions), which are faint smears rather than shapes `analyse_clip` can segment."""
    g = video.float().mean(0)
    w = (g - g.flatten(1).median(1).values[:, None, None]).clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(g.shape[1]).float(), torch.arange(g.shape[2]).float(), indexing="ij")
    mass = w.sum((1, 2)) + 1e-6
    track = torch.stack(((w * xs).sum((1, 2)) / mass, (w * ys).sum((1, 2)) / mass), dim=1)  # t 2
    t = torch.arange(g.shape[0]).float() - (g.shape[0] - 1) / 2
    slope = (track * t[:, None]).sum(0) / (t * t).sum()
    return float(slope @ torch.tensor(DIRECTIONS[direction], dtype=torch.float32)) * (g.shape[0] - 1)


def corpus_mean_travel(clips, captions) -> dict[str, float]:
    """`_travel` of the mean of the corpus's single-shape clips of each direction: what the ideal x0 prediction
    from pure noise shows (`mean_motion_probe`)."""
    travel = {}
    for d in DIRECTIONS:
        own = [i for i, c in enumerate(captions) if " and " not in c and parse_caption(c)[0].direction == d]
        if own:
            travel[d] = _travel(clips_to_model(clips[own]).mean(0), d)
    return travel


@torch.no_grad()
def mean_motion_probe(model, encoder, cfg, corpus_travel: dict[str, float], n: int = 10) -> dict:
    """Does the denoiser know where a prompted motion goes before any of it is visible? From pure noise (the
    first sampling step), the best x0 prediction is the mean of the prompt's clips: for "moving right", a faint
    blob sweeping from the left half to the right half, because a shape moving right starts on the left. A
    model that predicts the same static smear for every direction leaves the trajectory to the noise, which is
    what its samples then follow. `mean_motion_travel_px`: travel along the prompted direction of the mean x0
    prediction at the last training timestep (conditional, no guidance; `n` colours x shapes per direction),
    averaged over the four directions; `mean_motion_travel_corpus_px`: the same measure on the mean of the
    corpus's clips of each direction (`corpus_travel`, from `corpus_mean_travel`: what the ideal prediction shows)."""
    from lumiere.diffusion import training_scheduler

    scheduler = training_scheduler(cfg.diffusion)
    model = model.eval()
    t_last = scheduler.config.num_train_timesteps - 1
    ab = scheduler.alphas_cumprod[t_last]
    gen = torch.Generator().manual_seed(4321)  # the same noise for every model and step
    noise = torch.randn((n, 3, cfg.video.frames, cfg.video.size, cfg.video.size), generator=gen)
    pred = {}
    for d in DIRECTIONS:
        prompts = [f"a {list(COLORS)[i % len(COLORS)]} {SHAPES[i % len(SHAPES)]} moving {d}" for i in range(n)]
        ctx, pooled = encoder.encode_text(prompts)
        xt = noise * (1 - ab).sqrt()  # x_T: the signal's share is ~0 at the last timestep
        out = model(xt, torch.full((n,), t_last), ctx, pooled).float()
        x0 = ab.sqrt() * xt - (1 - ab).sqrt() * out if scheduler.config.prediction_type == "v_prediction" else (
            (xt - (1 - ab).sqrt() * out) / ab.sqrt())
        pred[d] = _travel(x0.mean(0), d)
    return {"mean_motion_travel_px": float(np.mean(list(pred.values()))),
            "mean_motion_travel_by_direction": pred,
            "mean_motion_travel_corpus_px": float(np.mean(list(corpus_travel.values()))) if corpus_travel else math.nan}


@torch.no_grad()
def sampling_trace(model, encoder, cfg, guidance: float, seed: int = 1000) -> dict[int, float]:
    """Where does sampling lose the prompted motion? {step: travel (px) along the prompted direction of that
    sampling step's x0 prediction, averaged over the colour x direction prompts} for the config's sampler (one
    seed). A model that knows the prompt's motion shows it from step 1 (`mean_motion_probe`); if the travel then
    fades over the middle steps, the model follows the trajectory it reads in x_t rather than the prompt there."""
    from lumiere.diffusion import sample, sampling_scheduler

    prompts = [p for p, _ in eval_prompts(1)]
    directions = [parse_caption(p)[0].direction for p in prompts]
    scheduler = sampling_scheduler(cfg.diffusion, cfg.sample.sampler, cfg.sample.steps)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), 3, cfg.video.frames, cfg.video.size, cfg.video.size), generator=gen)
    trace = {}

    def preview(step: int, x0: torch.Tensor) -> None:
        trace[step] = float(np.mean([_travel(x0[i], d) for i, d in enumerate(directions)]))

    sample(model.eval(), noise, scheduler, Conditioning(*encoder.encode_text(prompts)),
           guidance_scale=guidance, generator=gen, preview=preview)
    return trace


def model_file(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name) + ".safetensors"


class LoadedModel:
    """A variant's saved EMA weights in place of its `Trainer` (`--load-models`): what `evaluate` reads of one."""

    def __init__(self, name: str, model: torch.nn.Module, cfg, path: Path):
        if not path.exists():
            raise SystemExit(f"--load-models: no {path.name} in {path.parent} for variant {name!r}; name the "
                             "variants as the run that saved them did")
        model.load_state_dict(load_file(path))
        self.name, self.model, self.cfg = name, model, cfg
        self.step_fn = type("Steps", (), {"step": None})()
        self.time_s, self.log = None, []

    def done(self) -> bool:
        return True

    def ema_model(self):
        return self.model.eval()


def eval_prompts(seeds: int, first_seed: int = 0) -> list[tuple[str, int]]:
    prompts = []
    for i, (color, direction) in enumerate((c, d) for c in COLORS for d in DIRECTIONS):
        prompts.append(f"a {color} {SHAPES[i % len(SHAPES)]} moving {direction}")
    return [(p, s) for s in range(first_seed, first_seed + seeds) for p in prompts]


JUMP_PX = 4.0  # a centroid step this long is a jump: 3x the fastest corpus shape's ~1.3 px per frame


def score(video: np.ndarray, prompt: str) -> dict:
    want = parse_caption(prompt)[0]
    a = analyse_clip(video)
    c = a["centroids"]
    steps = c[1:] - c[:-1]
    ok = ~np.isnan(steps).any(axis=1)
    on_track = float((steps[ok] @ np.asarray(DIRECTIONS[want.direction], float) > 0).mean()) if ok.any() else 0.0
    return {
        "prompt": prompt,
        "color_ok": a["dominant_color"] == want.color,
        "direction_ok": a["direction"] == want.direction,
        "on_track": on_track,
        "smoothness": a["smoothness"],
        "area_cv": a["area_cv"],
        "present": bool((a["areas"] > 0).all()),
        "seen": f"{a['dominant_color']} {a['direction']}",
        "speed_px": float(np.hypot(*a["displacement"])),
        # the longest measurable frame-to-frame centroid step (nan when none is: such a video counts as jumping)
        "max_step_px": float(np.hypot(*steps[ok].T).max()) if ok.any() else math.nan,
    }


def summarise(rows: list[dict]) -> dict:
    def nanmed(k):
        v = np.array([r[k] for r in rows], float)
        return float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan")

    return {
        "videos": len(rows),
        "color": float(np.mean([r["color_ok"] for r in rows])),
        "direction": float(np.mean([r["direction_ok"] for r in rows])),
        "both": float(np.mean([r["color_ok"] and r["direction_ok"] for r in rows])),
        "on_track": float(np.mean([r["on_track"] for r in rows])),
        "smoothness": nanmed("smoothness"),
        "area_cv": nanmed("area_cv"),
        "present": float(np.mean([r["present"] for r in rows])),
        "no_jumps": float(np.mean([r["max_step_px"] <= JUMP_PX for r in rows])),
        "travel_px": nanmed("speed_px"),
    }


def generate(model, encoder, cfg, prompts: list[tuple[str, int]], batch: int,
             guidance: float | None = None) -> tuple[list[np.ndarray], float]:
    gen = TextToVideo(model, encoder, cfg, "benchmark")
    videos, t0 = [], time.perf_counter()
    for seed in sorted({s for _, s in prompts}):
        ps = [p for p, s in prompts if s == seed]
        for i in range(0, len(ps), batch):
            videos += list(gen.generate(ps[i:i + batch], seed=1000 + seed + i, guidance_scale=guidance).videos)
    return videos, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="same compute: training step time per temporal model")
    budget.add_argument("--steps", type=int, help="same number of steps per temporal model")
    ap.add_argument("--config", default="small")
    ap.add_argument("--clips", type=int, default=120, help="corpus clips (balanced over 60 combinations)")
    ap.add_argument("--t2i-steps", type=int, default=1000, help="steps of the shared 2D prior")
    ap.add_argument("--seeds", type=int, default=2, help="videos per prompt (20 prompts)")
    ap.add_argument("--batch", type=int, default=10, help="prompts per generation batch")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lumiere-quality-shapes"))
    ap.add_argument("--json", type=Path, help="write every score here")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny config, 12 clips, 20 t2i steps, 1 seed")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override for every model")
    ap.add_argument("--oracle-direction", action="store_true",
                    help="diagnostic: write each prompt's direction into the text features as a one-hot code")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE...]",
                    help="a temporal model to train, with its own overrides on top of --set (repeatable; "
                         "default: 'STUNet=' and 'fixed-temporal=stunet.temporal_resampling=false')")
    ap.add_argument("--eval-at", default="", metavar="STEP,STEP,...",
                    help="also score each model's EMA at these step counts on the way (a learning curve; each "
                         "point costs one generation pass)")
    ap.add_argument("--guidance", default="", metavar="SCALE,SCALE,...",
                    help="score every model at these classifier-free guidance scales (default: the config's "
                         "sample.guidance_scale); each scale costs one generation pass")
    ap.add_argument("--save-videos", type=Path, metavar="DIR",
                    help="write each evaluation's videos as one PNG per video (frames left to right) under DIR")
    ap.add_argument("--flip-augment", action="store_true",
                    help="train the temporal models on clips flipped at random (left-right, top-bottom) with the "
                         "caption's direction words swapped to match: every clip then also shows the other directions")
    ap.add_argument("--save-models", type=Path, metavar="DIR",
                    help="write the prior and each evaluated model's EMA weights under DIR as safetensors (to study "
                         "a trained model's sampling without retraining it)")
    ap.add_argument("--load-models", type=Path, metavar="DIR",
                    help="train nothing: load the prior and each variant's EMA weights from a --save-models DIR "
                         "(the same --set/--variant flags as the run that saved them) and score them, e.g. at other "
                         "guidance scales or sampler steps")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="generation seeds start here (e.g. choose a guidance scale on seeds 2.. and report on 0..)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP threads competing with "
                         "other processes ran 20-40x slower per step)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as training workers do (train.retain_host_memory)
    if args.minutes is None and args.steps is None:
        args.minutes = 8.0
    if args.quick:
        args.config, args.clips, args.t2i_steps, args.seeds = "tiny", 12, 20, 1
    t_start = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(cfg.train.seed)
    print(f"quality_shapes: config {cfg.name} ({cfg.video.frames} frames, {cfg.video.size}x{cfg.video.size}), "
          f"{args.clips} clips, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}", flush=True)

    corpus = args.workdir / f"corpus-{cfg.name}-{args.clips}"
    if not (corpus / "captions.jsonl").exists():
        make_corpus(corpus, args.clips, frames=cfg.video.frames, size=cfg.video.size, fps=cfg.video.fps,
                    seed=cfg.train.seed)
    clips, captions = load_corpus(corpus, cfg.video.frames)
    # clips no model trains on (another seed): the loss probe on these says whether a model knows what a direction
    # word means, not only which training clip a caption belongs to
    heldout_dir = args.workdir / f"heldout-{cfg.name}-48"
    if not (heldout_dir / "captions.jsonl").exists():
        make_corpus(heldout_dir, 48, frames=cfg.video.frames, size=cfg.video.size, fps=cfg.video.fps,
                    seed=cfg.train.seed + 9999)
    heldout_clips, heldout_captions = load_corpus(heldout_dir, cfg.video.frames)
    encoder = TextEncoder(cfg.text)
    if args.oracle_direction:
        encoder = OracleDirectionEncoder(encoder)
        print("oracle: the prompts' direction is written into the text features (a diagnostic)", flush=True)
    cond = Conditioning(*encoder.encode_text(captions))

    t0 = time.perf_counter()
    prior = build_prior(cfg)
    if args.load_models:
        prior.load_state_dict(load_file(args.load_models / "prior.safetensors"))
    else:
        t2i = Trainer("t2i prior", prior, cfg, "t2i", clips, cond, args.t2i_steps)
        while not t2i.done():
            t2i.step()
        prior.load_state_dict(t2i.step_fn.ema.state_dict(prior))

    def save_model(model: torch.nn.Module, name: str) -> None:
        if args.save_models:
            args.save_models.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.save_models / model_file(name))

    save_model(prior, "prior")
    t2i_s = time.perf_counter() - t0

    variants = parse_variants(args.variant)
    models = {}
    for name, extra in variants.items():
        vcfg = load_config(args.config, [*args.overrides, *extra])
        torch.manual_seed(vcfg.train.seed)  # every variant's new layers start from the same random state
        models[name] = (build_stunet(vcfg, copy.deepcopy(prior)), vcfg)
    per_step = {}
    if args.load_models:
        trainers = {name: LoadedModel(name, m, c, args.load_models / model_file(name))
                    for name, (m, c) in models.items()}
    else:
        # side-by-side timing (alternating, so load drift hits both), then the step budgets
        times = {name: [] for name in models}
        for _ in range(2 if len(models) <= 3 else 1):
            for name, (m, c) in models.items():
                times[name].append(step_time(m, c, "stunet", clips, cond))
        per_step = {name: float(np.median(t)) for name, t in times.items()}
        if args.steps is not None:
            budgets = {name: args.steps for name in models}
            mode = f"same steps: {args.steps} each"
        else:
            budgets = {name: max(1, int(args.minutes * 60 / s)) for name, s in per_step.items()}
            mode = f"same compute: {args.minutes:g} min of training step time each"
        print("step time (side by side): " + ", ".join(f"{n} {s:.3f}s" for n, s in per_step.items())
              + f"; {mode}: " + ", ".join(f"{n} {b} steps" for n, b in budgets.items()), flush=True)

        # --minutes: each trains until it has spent that much step time (the step estimate above only sets the LR
        # schedule's length): a timing taken while the machine was busier than later cannot shrink the budget
        budget_s = None if args.steps is not None else args.minutes * 60
        flipped = ([Conditioning(*encoder.encode_text([mirrored_caption(c, f) for c in captions])) for f in (1, 2, 3)]
                   if args.flip_augment else None)
        trainers = {name: Trainer(name, m, c, "stunet", clips, cond, budgets[name], budget_s, flipped)
                    for name, (m, c) in models.items()}
    prompts = eval_prompts(args.seeds, args.first_seed)
    results, all_rows = {}, {}
    real = [score(v.numpy(), c) for v, c in zip(clips, captions, strict=True) if " and " not in c]
    results["real corpus clips"] = {**summarise(real), "steps": None, "train_s": None, "gen_s": None}
    eval_at = {int(s) for s in args.eval_at.split(",") if s.strip()}
    guidance = [float(w) for w in args.guidance.split(",") if w.strip()] or [cfg.sample.guidance_scale]
    eval_s = 0.0

    corpus_travel = corpus_mean_travel(clips, captions)

    def evaluate(label: str, tr: Trainer) -> None:
        ema = tr.ema_model()
        save_model(ema, label)
        separation = text_separation(ema, encoder)
        probe = direction_probe(ema, encoder, tr.cfg, clips, captions)
        heldout = direction_probe(ema, encoder, tr.cfg, heldout_clips, heldout_captions)
        probe.update({f"heldout_{k}": v for k, v in heldout.items()})
        probe.update(mean_motion_probe(ema, encoder, tr.cfg, corpus_travel))
        print(f"  {label}: mean-motion probe: the x0 prediction from pure noise travels "
              f"{probe['mean_motion_travel_px']:+.1f} px the prompted way (corpus mean "
              f"{probe['mean_motion_travel_corpus_px']:+.1f}; by direction "
              + " ".join(f"{d} {v:+.1f}" for d, v in probe["mean_motion_travel_by_direction"].items()) + ")",
              flush=True)
        print(f"  {label}: loss probe on held-out clips: {heldout['probe_direction_by_loss']:.0%} lowest; gap by "
              "noise level: " + " ".join(f"{lv:g}:{g:+.2%}" for lv, g in heldout["probe_gap_by_level"].items()),
              flush=True)
        print(f"  {label}: loss probe: the true direction has the lowest loss for "
              f"{probe['probe_direction_by_loss']:.0%} of clips (chance 25%); a wrong direction costs "
              f"{probe['probe_wrong_direction_loss_gap']:+.2%} loss; true -> lowest-loss direction: "
              + "; ".join(f"{d}: " + " ".join(f"{e}{n}" for e, n in row.items() if n)
                          for d, row in probe["probe_confusion"].items())
              + "; gap by noise level: "
              + " ".join(f"{lv:g}:{g:+.2%}" for lv, g in probe["probe_gap_by_level"].items()),
              flush=True)
        for w in guidance:
            name = label if len(guidance) == 1 else f"{label}, guidance {w:g}"
            trace = sampling_trace(ema, encoder, tr.cfg, w)
            shown = [k for k in (1, 2, 3, 5, 10, 20, 50, 100) if k < len(trace)] + [len(trace)]
            print(f"  {name}: sampling trace: the x0 prediction travels the prompted way by "
                  + " ".join(f"step {k} {trace[k]:+.1f}" for k in shown) + " px", flush=True)
            videos, gen_s = generate(ema, encoder, tr.cfg, prompts, args.batch, w)
            rows = [score(v, p) for v, (p, _) in zip(videos, prompts, strict=True)]
            all_rows[name] = rows
            if args.save_videos:
                out = args.save_videos / "".join(c if c.isalnum() else "_" for c in name)
                out.mkdir(parents=True, exist_ok=True)
                for j, (v, (p, seed)) in enumerate(zip(videos, prompts, strict=True)):
                    mark = "ok" if rows[j]["direction_ok"] else "wrong"
                    save_png(out / f"{j:02d}-{p.replace(' ', '_')}-seed{seed}-{mark}.png",
                             spritesheet(v, cols=len(v)))
            results[name] = {**summarise(rows), "steps": tr.step_fn.step, "train_s": tr.time_s, "gen_s": gen_s,
                             "final_loss": tr.log[-1]["loss"] if tr.log else math.nan, "guidance": w,
                             "sampling_trace_px": trace, **separation, **probe}
            r = results[name]
            print(f"  {name}: {len(videos)} videos in {gen_s:.0f}s: colour {r['color']:.0%} direction "
                  f"{r['direction']:.0%} on-track {r['on_track']:.0%} no jumps {r['no_jumps']:.0%}", flush=True)

    t0 = time.perf_counter()
    while not all(t.done() for t in trainers.values()):
        # whichever is furthest behind its own budget (as a fraction) steps next: all progress together
        t = min((t for t in trainers.values() if not t.done()), key=Trainer.progress)
        t.step()
        if t.step_fn.step in eval_at and not t.done():
            e0 = time.perf_counter()
            evaluate(f"{t.name} @ {t.step_fn.step}", t)
            eval_s += time.perf_counter() - e0
    train_wall = time.perf_counter() - t0 - eval_s

    for name, tr in trainers.items():
        evaluate(name, tr)

    print(f"\nt2i prior: {args.t2i_steps} steps in {t2i_s / 60:.1f} min; temporal models trained interleaved in "
          f"{train_wall / 60:.1f} min wall; total {(time.perf_counter() - t_start) / 60:.1f} min")
    print(f"{len(prompts)} prompts per model ({len(prompts) // args.seeds} colour x direction, shapes in rotation, "
          f"{args.seeds} seed(s))\n")
    print("| model | steps | train step time min | final loss | colour | direction | colour+direction | on-track steps "
          "| smoothness px (median) | area cv (median) | shape in every frame | no jumps | net travel px (median) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        steps = "" if r["steps"] is None else r["steps"]
        tmin = "" if r["train_s"] is None else f"{r['train_s'] / 60:.1f}"
        loss = f"{r['final_loss']:.4f}" if "final_loss" in r else ""
        print(f"| {name} | {steps} | {tmin} | {loss} | {r['color']:.0%} | {r['direction']:.0%} | {r['both']:.0%} "
              f"| {r['on_track']:.0%} | {r['smoothness']:.2f} | {r['area_cv']:.2f} | {r['present']:.0%} "
              f"| {r['no_jumps']:.0%} | {r['travel_px']:.1f} |")
    print("\nLoss probe (direction_probe): share of clips whose true direction gives the lowest loss (chance 25%); "
          "mean relative loss increase of a wrong direction")
    for name, r in results.items():
        if "probe_direction_by_loss" in r:
            print(f"  {name}: {r['probe_direction_by_loss']:.0%}; {r['probe_wrong_direction_loss_gap']:+.2%}; "
                  f"held-out clips {r['heldout_probe_direction_by_loss']:.0%}; "
                  f"{r['heldout_probe_wrong_direction_loss_gap']:+.2%}; mean-motion travel "
                  f"{r['mean_motion_travel_px']:+.1f} px (corpus mean {r['mean_motion_travel_corpus_px']:+.1f})")
    print("\nText as the motion layers see it: mean cosine between prompts that differ only in direction / only in "
          "colour (1 = indistinguishable)")
    for name, r in results.items():
        if "encoder_direction_cos" in r:
            motion = (f"motion text path {r['motion_direction_cos']:.3f} / {r['motion_colour_cos']:.3f}"
                      if "motion_direction_cos" in r else "no motion text path")
            print(f"  {name}: frozen encoder pooled {r['encoder_direction_cos']:.3f} / {r['encoder_colour_cos']:.3f}; "
                  f"{motion}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                         "per_step_s": per_step, "rows": all_rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
