"""Shared fixtures. Model tests use the `tiny` config (a few channels, 8 frames, 32×32) on CPU."""

import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_cfg():
    from lumiere.config import load_config

    return load_config("tiny")


def perturb_(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised outputs become non-trivial (a 'trained' model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `lumiere` CLI in a subprocess (as a user would), capturing output."""
    return subprocess.run(
        [sys.executable, "-m", "lumiere.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole suite; 4 logical CPUs on 2 cores (see DEVELOPERS: 2 deadlocks)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
