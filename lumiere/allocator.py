"""Host memory allocator settings for CPU training: keep freed memory mapped between steps.

A training step on the CPU allocates and frees the same activations every step (MBs each: a 16-channel 32×32
feature map of 128 frames is 8 MiB). glibc's malloc serves blocks above its mmap threshold (128 KiB, adapting
upwards only as far as freed blocks teach it) with a fresh `mmap` and unmaps them on `free`, and trims the heap's
top above 128 KiB; so each step maps new pages again and the kernel zero-fills every one on first touch.
Measured on the 2-core development VM (benchmarks/RESULTS.md, "The host allocator"): ~39,000 page faults per
step of the `small` STUNet (150 MB of pages zero-filled per step), ~80 with these settings. What that buys in
step time depends on how dear a page fault is on the machine (a VM's are dearer); on that VM it was small next to
the step's arithmetic (see RESULTS.md). jemalloc or tcmalloc (what PyTorch's CPU performance guides preload) do
the same job; these three glibc settings need no extra library:

- M_MMAP_THRESHOLD at its ceiling (32 MiB on 64-bit): blocks below it come from the heap, where a freed block is
  reused by the next step instead of being unmapped;
- M_TRIM_THRESHOLD at its maximum: freed memory at the top of the heap is kept rather than returned to the OS;
- M_TOP_PAD: the heap grows in 256 MiB steps, fewer `brk` calls while a step's activations pile up.

The price is that the process keeps its peak heap mapped (it is reused at the next step, which is the point).
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
GLIBC_DEFAULTS = {M_MMAP_THRESHOLD: 128 * 2**10, M_TRIM_THRESHOLD: 128 * 2**10, M_TOP_PAD: 128 * 2**10}
RETAIN = {M_MMAP_THRESHOLD: MMAP_THRESHOLD_MAX, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 256 * 2**20}


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").mallopt  # glibc only: musl has no mallopt settings that matter here
    except (OSError, AttributeError):
        return None


def _apply(settings: dict[int, int]) -> bool:
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return all(mallopt(param, value) == 1 for param, value in settings.items())


def retain_freed_memory() -> bool:
    """Keep freed host memory mapped for reuse (the settings above). True when applied (Linux with glibc); a
    no-op elsewhere. Safe to call more than once, from any thread."""
    return _apply(RETAIN)


def release_freed_memory() -> bool:
    """glibc's defaults again (the baseline of the side-by-side benchmark in benchmarks/train_throughput.py)."""
    return _apply(GLIBC_DEFAULTS)
