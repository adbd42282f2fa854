"""Training at a scale past one device's memory, on CPU: gradient accumulation, activation checkpointing that
covers the temporal blocks, and FSDP2 (`train.parallelism: fsdp`) on a real 2-process gloo group, matched against
DDP and resumed from its sharded checkpoint on the same and on another worker count."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from lumiere.checkpoint import build_stunet, load_weights, save_checkpoint
from lumiere.config import load_config
from lumiere.diffusion import Conditioning
from lumiere.parallel import is_sharded, shard_model
from lumiere.trainer import TrainStep

STEPS, MORE = 3, 2


def _cfg(*overrides: str):
    # dropout off: it draws from torch's global RNG, which micro-batching and ranks would consume differently
    return load_config("tiny", ["train.seed=3", "train.warmup_steps=1", "train.lr=0.01", "unet.dropout=0.0",
                                *overrides])


def _model(cfg):
    torch.manual_seed(0)  # the same initial weights in every process
    model = build_stunet(cfg)
    with torch.no_grad():  # the zero-initialised output layers would make the first steps' losses all alike
        for p in model.temporal_parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _batch(cfg, seed: int, b: int = 4):
    g = torch.Generator().manual_seed(seed)
    d, e = cfg.text.dims()
    clips = torch.rand(b, 3, cfg.video.frames, cfg.video.size, cfg.video.size, generator=g) * 2 - 1
    return clips, Conditioning(torch.randn(b, 16, d, generator=g), torch.randn(b, e, generator=g))


# --- gradient accumulation and activation checkpointing (one process) ---------------------------------------------
class _CountingForward(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.batch_sizes = model, []

    def forward(self, x, *args):
        self.batch_sizes.append(x.shape[0])
        return self.model(x, *args)


def test_grad_accum_gives_the_whole_batch_gradient_in_micro_batches():
    runs = {}
    for accum in (1, 2, 4):
        cfg = _cfg(f"train.grad_accum={accum}")
        model = _model(cfg)
        counting = _CountingForward(model)
        step = TrainStep(model, cfg, "stunet", forward=counting)
        losses = [step(*_batch(cfg, s))["loss"] for s in range(STEPS)]
        assert counting.batch_sizes == [4 // accum] * accum * STEPS, "the batch was not split into micro-batches"
        runs[accum] = (losses, {n: p.detach().clone() for n, p in model.named_parameters()})
    base_losses, base_params = runs[1]
    assert base_losses[0] != base_losses[-1]
    for accum in (2, 4):
        losses, params = runs[accum]
        assert losses == pytest.approx(base_losses, rel=1e-5, abs=1e-6), f"grad_accum={accum} changed the losses"
        worst = max((params[n] - base_params[n]).abs().max().item() for n in params)
        assert worst < 1e-5, f"grad_accum={accum} moved the weights differently (max diff {worst:.2e})"


def test_grad_accum_must_divide_the_batch():
    with pytest.raises(Exception, match="grad_accum"):
        _cfg("train.grad_accum=3")


def _counted(fn, counts: dict, key: str):
    def run(*args, **kwargs):
        counts[key] += 1
        return fn(*args, **kwargs)

    return run


def test_activation_checkpointing_recomputes_temporal_blocks_with_the_same_gradients():
    cfg = _cfg()
    grads, calls = {}, {}
    for on in (False, True):
        model = _model(cfg)
        model.prior.activation_checkpointing = on
        counts = {"temporal": 0, "spatial": 0}
        # counted in `forward` itself: module hooks do not run when checkpointing recomputes a module
        temporal = list(model.temporal_convs.values()) + list(model.temporal_attns.values())
        spatial = [block for level in model.prior.up for block in level.blocks]  # (down.0 sees no gradient)
        for kind, modules in (("temporal", temporal), ("spatial", spatial)):
            for m in modules:
                m.forward = _counted(m.forward, counts, kind)
        model.train()
        x, cond = _batch(cfg, 0, b=2)
        out = model(x, torch.tensor([10, 500]), cond.context, cond.pooled)
        forward_only = dict(counts)
        out.square().mean().backward()
        calls[on] = (forward_only, dict(counts))
        grads[on] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (fwd_off, total_off), (fwd_on, total_on) = calls[False], calls[True]
    assert total_off == fwd_off, "without checkpointing nothing is recomputed"
    assert total_on["temporal"] == 2 * fwd_on["temporal"] > 0, "the temporal blocks were not recomputed in backward"
    assert total_on["spatial"] == 2 * fwd_on["spatial"] > 0
    assert grads[True].keys() == grads[False].keys() and grads[False]
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-7)


# --- FSDP2 vs DDP on a 2-process gloo group ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gang(rank: int, world: int, port: int, out: str, mode: str, resume: bool) -> None:
    """One rank: train STEPS steps (then MORE, the uninterrupted reference) or resume from out/ckpt for MORE."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out, cfg = Path(out), _cfg(f"train.parallelism={mode}", "train.grad_accum=2")
        model, device = _model(cfg), torch.device("cpu")
        if resume:
            load_weights(model, out / "ckpt", use_ema=False)
        if mode == "fsdp":
            forward = shard_model(model, device)
        else:
            forward = DistributedDataParallel(model)
        step = TrainStep(model, cfg, "stunet", forward=forward, rank=rank)
        if resume:
            from safetensors.torch import load_file

            step.load_state_dict(torch.load(out / "ckpt" / "train_state.pt", weights_only=True),
                                 load_file(out / "ckpt" / "ema.safetensors") if not is_sharded(model) else None)
            step.load_shards(out / "ckpt")
        first = step.step
        if resume and world == 1:  # another worker count: the resharded optimizer state must be the saved one
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            full = get_optimizer_state_dict(model, step.optimizer, options=StateDictOptions(full_state_dict=True))
            torch.save({"optimizer": full, "ema": step.full_ema_state()}, out / "resharded_rank0.pt")
            return
        losses = []
        for s in range(first, first + (MORE if resume else STEPS + MORE)):
            losses.append(step(*_batch(cfg, 100 * rank + s))["loss"])
            if not resume and step.step == STEPS:
                ema, weights = step.full_ema_state(keep=rank == 0), step.full_model_state(keep=rank == 0)
                generators = step.gather_generators()
                step.save_shards(out / "ckpt")
                if mode == "fsdp":
                    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

                    full = get_optimizer_state_dict(model, step.optimizer,
                                                    options=StateDictOptions(full_state_dict=True))
                    if rank == 0:
                        torch.save({"optimizer": full, "ema": ema}, out / "saved_rank0.pt")
                if rank == 0:
                    shell = _model(cfg)
                    shell.load_state_dict(weights)
                    save_checkpoint(out / "ckpt.tmp", shell, cfg, "stunet", step=step.step, ema_state=ema,
                                    train_state=step.state_dict(generators))
                    (out / "ckpt").mkdir(exist_ok=True)
                    for f in (out / "ckpt.tmp").iterdir():  # beside the shards every rank wrote into ckpt/
                        os.replace(f, out / "ckpt" / f.name)
                dist.barrier()
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        torch.save({"losses": losses, "local_numel": local, "numel": sum(p.numel() for p in model.parameters())},
                   out / f"{'resumed' if resume else 'run'}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(tmp: Path, mode: str, world: int = 2, resume: bool = False) -> list[dict]:
    mp.spawn(_gang, args=(world, _free_port(), str(tmp), mode, resume), nprocs=world, join=True)
    name = "resumed" if resume else "run"
    return [torch.load(tmp / f"{name}_rank{r}.pt", weights_only=True) for r in range(world)
            if (tmp / f"{name}_rank{r}.pt").exists()]


@pytest.mark.timeout(300)
def test_fsdp_matches_ddp_shards_the_weights_and_resumes_on_any_worker_count(tmp_path):
    ddp_dir, fsdp_dir = tmp_path / "ddp", tmp_path / "fsdp"
    ddp_dir.mkdir()
    fsdp_dir.mkdir()
    ddp, fsdp = _spawn(ddp_dir, "ddp"), _spawn(fsdp_dir, "fsdp")
    for r in range(2):
        assert fsdp[r]["losses"] == pytest.approx(ddp[r]["losses"], rel=1e-4, abs=1e-6), (
            f"rank {r}: FSDP losses {fsdp[r]['losses']} differ from DDP's {ddp[r]['losses']}")
    assert ddp[0]["losses"][0] != ddp[0]["losses"][-1]
    # sharded: each rank holds about half the parameters (dim-0 shards, padded), DDP all of them
    assert ddp[0]["local_numel"] == ddp[0]["numel"]
    assert fsdp[0]["local_numel"] + fsdp[1]["local_numel"] == pytest.approx(fsdp[0]["numel"], rel=0.05)
    assert fsdp[0]["local_numel"] < 0.6 * fsdp[0]["numel"]
    assert (fsdp_dir / "ckpt" / "train_dcp" / ".metadata").exists()

    # resume on the same 2 ranks: the steps after the checkpoint are the uninterrupted run's
    resumed = _spawn(fsdp_dir, "fsdp", resume=True)
    for r in range(2):
        assert resumed[r]["losses"] == pytest.approx(fsdp[r]["losses"][STEPS:], rel=1e-4, abs=1e-6), (
            f"rank {r}: the resumed FSDP run diverged from the uninterrupted one")

    # resume on 1 rank: the sharded optimizer moments and EMA are resharded to the new world size, values intact
    _spawn(fsdp_dir, "fsdp", world=1, resume=True)
    saved = torch.load(fsdp_dir / "saved_rank0.pt", weights_only=True)
    again = torch.load(fsdp_dir / "resharded_rank0.pt", weights_only=True)
    moments = saved["optimizer"]["state"]
    assert moments and moments.keys() == again["optimizer"]["state"].keys()
    for name, st in moments.items():
        torch.testing.assert_close(again["optimizer"]["state"][name]["exp_avg"], st["exp_avg"])
        torch.testing.assert_close(again["optimizer"]["state"][name]["exp_avg_sq"], st["exp_avg_sq"])
    for name, value in saved["ema"].items():
        torch.testing.assert_close(again["ema"][name], value)


def test_every_process_builds_the_same_stunet_whatever_its_hash_seed(tmp_path):
    """Ranks are separate processes with their own string-hash seeds: a module order taken from a set made
    ranks initialise, all-reduce and shard the temporal attention blocks mismatched (found by the FSDP test)."""
    import subprocess
    import sys

    script = ("import torch, sys; from lumiere.config import load_config; from lumiere.checkpoint import build_stunet;"
              "torch.manual_seed(0); m = build_stunet(load_config('tiny'));"
              "torch.save([(n, p.detach()) for n, p in m.named_parameters()], sys.argv[1])")
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{seed}.pt")], check=True, timeout=120,
                       env={**os.environ, "PYTHONHASHSEED": seed}, cwd=Path(__file__).resolve().parents[1])
    built = [torch.load(tmp_path / f"{seed}.pt", weights_only=True) for seed in ("1", "2")]
    for other in built[1:]:
        assert [n for n, _ in other] == [n for n, _ in built[0]], "the parameter order depends on the hash seed"
        for (name, a), (_, b) in zip(built[0], other, strict=True):
            assert torch.equal(a, b), f"{name} initialised differently under another hash seed"


def test_ema_follows_the_warmup_decay_by_step_and_resumes_in_step():
    from lumiere.trainer import EMA

    model = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.5)
    expected = model.weight.detach().clone()
    for step in range(6):
        with torch.no_grad():
            model.weight.fill_(float(step + 1))
        ema.update(model, step)
        decay = 0.0 if step == 0 else min(0.5, (1 + step) / (10 + step))  # the first update copies the weights
        expected = decay * expected + (1 - decay) * model.weight.detach()
        torch.testing.assert_close(ema.shadow["weight"], expected)
    resumed = EMA(model, decay=0.5)  # a resume: the shadow from the checkpoint, the decay from the step
    resumed.load_shadow({"weight": ema.shadow["weight"].clone()})
    for e in (ema, resumed):
        e.update(model, 6)
    torch.testing.assert_close(resumed.shadow["weight"], ema.shadow["weight"])
