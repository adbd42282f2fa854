"""The learning-rate schedules of TrainStep: cosine from the end of the warm-up, or wsd (warm-up, stable, decay),
seen through the LR the optimizer really uses step by step, and kept across a checkpoint resume."""

import pytest
import torch
from torch import nn

from lumiere.config import load_config
from lumiere.diffusion import Conditioning
from lumiere.trainer import TrainStep


class Denoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, context, pooled):
        return x * self.w


def lrs(schedule: str, steps: int = 100, start: TrainStep | None = None, n: int | None = None,
        **train) -> tuple[list[float], TrainStep]:
    cfg = load_config("tiny", [f"train.lr_schedule={schedule}", f"train.max_steps={steps}", "train.warmup_steps=10",
                               "train.lr=0.01", *(f"train.{k}={v}" for k, v in train.items())])
    step = start or TrainStep(Denoiser(), cfg, "t2i")
    clips = torch.zeros(2, 3, 2, 8, 8)
    cond = Conditioning(torch.zeros(2, 4, cfg.unet.context_dim), torch.zeros(2, cfg.unet.pooled_dim))
    return [step(clips, cond)["lr"] for _ in range(n or steps)], step


def test_wsd_holds_the_peak_until_its_decay_window_then_ends_where_cosine_ends():
    cosine, _ = lrs("cosine")
    wsd, _ = lrs("wsd", lr_decay_fraction=0.2)
    peak = 0.01
    # both warm up alike; cosine starts to fall at once, wsd holds the peak through step 80 (of 100)
    assert cosine[:10] == pytest.approx(wsd[:10])
    assert wsd[10:80] == pytest.approx([peak] * 70)
    assert cosine[40] < 0.8 * peak
    # then wsd falls monotonically to the same 10 % floor as cosine, which it reaches at the end of the run
    tail = wsd[79:]
    assert all(a >= b for a, b in zip(tail, tail[1:], strict=False)) and tail[0] > tail[-1]
    assert wsd[-1] == pytest.approx(cosine[-1]) == pytest.approx(0.1 * peak, rel=0.02)
    # wsd spends more LR in total (what a model that must escape a plateau uses)
    assert sum(wsd) > 1.4 * sum(cosine)


def test_a_resumed_wsd_run_continues_its_schedule(tmp_path):
    whole, _ = lrs("wsd", lr_decay_fraction=0.3)
    first, step = lrs("wsd", n=75, lr_decay_fraction=0.3)
    torch.save(step.state_dict(), tmp_path / "state.pt")
    cfg = step.cfg
    resumed = TrainStep(Denoiser(), cfg, "t2i")
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    rest, _ = lrs("wsd", start=resumed, n=25, lr_decay_fraction=0.3)
    assert first + rest == pytest.approx(whole)


@pytest.mark.parametrize("override, message", [
    ("train.lr_schedule=linear", "lr_schedule"),
    ("train.lr_decay_fraction=0", "lr_decay_fraction must be in (0, 1]"),
    ("train.lr_decay_fraction=1.5", "lr_decay_fraction must be in (0, 1]"),
])
def test_a_bad_schedule_setting_is_refused_with_its_name(override, message):
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace("]", r"\]")):
        load_config("tiny", [override])
