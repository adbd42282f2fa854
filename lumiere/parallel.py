"""Data parallelism for training: `train.parallelism: ddp | fsdp`, chosen in the job, never a fork of the loop.

ddp   every rank holds the full weights, gradients, AdamW moments and EMA; gradients are all-reduced
      (torch DDP, wrapped by Ray Train's `prepare_model`).
fsdp  FSDP2 (`torch.distributed.fsdp.fully_shard`): each spatial block, each temporal block and the rest of the
      model are one sharding unit; every parameter is a DTensor sharded on dim 0 over the ranks, so weights,
      gradients, the optimizer's moments and the EMA (built from the sharded parameters) each take 1/world of
      the memory. A unit's weights are all-gathered for its forward/backward and freed after.

Checkpoints stay one format for both: rank 0 writes the full weights and EMA (gathered, for serving and
`--init-from`); under fsdp every rank also writes its shard of the optimizer state and EMA with
torch.distributed.checkpoint (`train_dcp/`), which reshards on load, so a run resumes on another worker count.
Imports torch only (keeps `lumiere/` usable without Ray).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

PARALLELISMS = ("ddp", "fsdp")
DCP_DIR = "train_dcp"


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units, innermost first: the prior's spatial blocks, the STUNet's temporal
    blocks and resamplers. What is left (embeddings, stem, head) belongs to the root unit."""
    from .stunet import STUNet
    from .unet2d import SpatialBlock

    units = [m for m in model.modules() if isinstance(m, SpatialBlock)]
    if isinstance(model, STUNet):
        for group in (model.temporal_convs, model.temporal_attns, model.time_down, model.time_up):
            units.extend(group.values())
    return units


def shard_model(model: nn.Module, device: torch.device, mixed_precision: torch.dtype | None = None) -> nn.Module:
    """FSDP2-shard `model` in place over every rank of the default process group; returns it (now an
    FSDPModule). `mixed_precision`: the dtype weights are gathered and computed in (e.g. bf16 on GPU), with
    gradients reduced in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world = torch.distributed.get_world_size() if _dist_ready() else 1
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32) if mixed_precision else None
    kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    for unit in sharding_units(model):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank calls it); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(state: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """The full CPU tensors of a possibly sharded state dict, gathered one tensor at a time so no rank ever holds
    more than one extra full tensor on the device. Every rank must call it (each DTensor is a collective);
    `keep=False` (ranks that do not write) drops each gathered tensor at once."""
    out = {}
    for k, v in state.items():
        full = full_tensor(v.detach())
        if keep:
            out[k] = full.to("cpu", copy=True)
    return out


def set_gradient_sync(forward: nn.Module, model: nn.Module, sync: bool):
    """A context for one micro-batch's backward: with `sync=False` the gradient all-reduce (DDP) or
    reduce-scatter (FSDP) is skipped and gradients accumulate locally until the last micro-batch syncs them."""
    import contextlib

    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(forward, "no_sync"):
        return forward.no_sync()
    inner = getattr(forward, "_orig_mod", None)  # torch.compile of a DDP module
    if not sync and inner is not None and hasattr(inner, "no_sync"):
        return inner.no_sync()
    return contextlib.nullcontext()


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema_shadow: dict[str, torch.Tensor]) -> None:
    """Every rank writes its shard of the optimizer state and EMA (a collective). Each rank may write to a
    directory of its own: Ray Train merges the workers' checkpoint directories into one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer), "ema": dict(ema_shadow)}
    dcp.save(state, checkpoint_id=str(directory / DCP_DIR))


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema_shadow: dict[str, torch.Tensor]) -> None:
    """Load what `save_sharded` wrote, resharded to this run's ranks (any worker count); a collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer), "ema": dict(ema_shadow)}
    dcp.load(state, checkpoint_id=str(directory / DCP_DIR))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    for name, value in state["ema"].items():  # loaded in place for DTensors; copied for plain tensors
        if value is not ema_shadow[name]:
            ema_shadow[name].copy_(value)


def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute activations in backward for every U-Net in `model` (for a STUNet: its prior's spatial blocks
    and, through the inflation hooks, its temporal blocks)."""
    from .unet2d import UNet2D

    for m in model.modules():
        if isinstance(m, UNet2D):
            m.activation_checkpointing = on
