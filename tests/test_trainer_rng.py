"""Per-rank random numbers in TrainStep: ranks draw different noise and timesteps; a resume restores each rank's own
generator, also through a real 2-process gloo group (what Ray Train's DDP workers are)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lumiere.config import load_config
from lumiere.diffusion import Conditioning
from lumiere.trainer import TrainStep, rank_seed


class Recorder(nn.Module):
    """A denoiser that records what the training step feeds it: the noisy input and the timesteps."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, context, pooled):
        self.seen.append((x.detach().clone(), t.detach().clone()))
        return x * self.w


def _cfg():
    return load_config("tiny", ["train.seed=7"])


def _batch():
    d, e = _cfg().text.dims()
    return torch.zeros(4, 3, 32, 32), Conditioning(torch.ones(4, 16, d), torch.ones(4, e))


def _draws(step: TrainStep, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, cond = _batch()
    step.model.seen.clear()
    for _ in range(n):
        step(x.unsqueeze(2), cond)  # t2i: one random frame of a 1-frame clip
    return list(step.model.seen)


def test_ranks_draw_different_noise_and_timesteps():
    a, b = (TrainStep(Recorder(), _cfg(), "t2i", rank=r) for r in (0, 1))
    for (xa, ta), (xb, tb) in zip(_draws(a, 3), _draws(b, 3), strict=True):
        assert not torch.equal(ta, tb), "two ranks drew the same timesteps"
        assert (xa - xb).abs().max() > 0.1, "two ranks drew the same noise"
    same = TrainStep(Recorder(), _cfg(), "t2i", rank=1)  # the same rank again: the same numbers (reproducible)
    for (xa, ta), (xb, tb) in zip(_draws(same, 2), _draws(TrainStep(Recorder(), _cfg(), "t2i", rank=1), 2),
                                  strict=True):
        assert torch.equal(ta, tb) and torch.equal(xa, xb)
    assert rank_seed(7, 0) == 7 and len({rank_seed(s, r) for s in range(4) for r in range(4)}) == 16


def test_resume_restores_each_ranks_own_generator(tmp_path):
    ranks = [TrainStep(Recorder(), _cfg(), "t2i", rank=r) for r in (0, 1)]
    for s in ranks:
        _draws(s, 2)
    generators = [s.generator.get_state() for s in ranks]
    torch.save(ranks[0].state_dict(generators), tmp_path / "train_state.pt")  # rank 0 writes for the gang
    expected = [_draws(s, 2) for s in ranks]  # what each rank draws next, uninterrupted

    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    for r in (0, 1):
        resumed = TrainStep(Recorder(), _cfg(), "t2i", rank=r)
        assert "own generator state" in resumed.load_state_dict(state)
        assert resumed.step == 2
        for (xa, ta), (xb, tb) in zip(_draws(resumed, 2), expected[r], strict=True):
            assert torch.equal(ta, tb) and torch.equal(xa, xb), f"rank {r} did not resume its own random stream"

    # a third rank (the gang grew) gets a fresh stream of its own, unlike either saved one
    extra = TrainStep(Recorder(), _cfg(), "t2i", rank=2)
    assert "fresh seed" in extra.load_state_dict(state)
    t_extra = _draws(extra, 1)[0][1]
    assert all(not torch.equal(t_extra, e[0][1]) for e in expected)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gang_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        step = TrainStep(Recorder(), _cfg(), "t2i", rank=rank)
        _draws(step, 2)
        generators = step.gather_generators()  # the collective every rank runs before rank 0 saves
        if rank == 0:
            torch.save(step.state_dict(generators), os.path.join(out_dir, "train_state.pt"))
        torch.save(_draws(step, 1)[0][1], os.path.join(out_dir, f"next_t_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_gloo_gang_checkpoint_holds_every_ranks_generator(tmp_path):
    mp.spawn(_gang_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["generator_ranks"] == 2 and len(state["generators"]) == 2
    assert not torch.equal(state["generators"][0], state["generators"][1])
    for r in (0, 1):
        resumed = TrainStep(Recorder(), _cfg(), "t2i", rank=r)
        resumed.load_state_dict(state)
        assert torch.equal(_draws(resumed, 1)[0][1], torch.load(tmp_path / f"next_t_rank{r}.pt", weights_only=True))
