"""The C allocator's settings for training loops: keep a step's freed buffers for the next step.

A CPU training step allocates and frees some hundred megabytes of tensors of a few
megabytes each. glibc's malloc serves such sizes from fresh ``mmap`` pages or trims the
freed top of its heap back to the kernel, adapting its thresholds as it goes, so some
steps fault their buffers' pages in again and are zeroed by the kernel. On the two-tower
step of a 10M-event log (one thread) that made the mean step 10% slower than its median,
and under DDP every rank waits for the slowest at each collective, so the uneven steps
cost more than their mean.
"""

import ctypes
import logging
import platform

log = logging.getLogger("funnel.train")

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MiB = 1 << 20

MMAP_THRESHOLD = 32 * MiB
"""Blocks below this come from the heap, where they are reused (glibc's own ceiling for its adaptive threshold)."""
TRIM_THRESHOLD = 256 * MiB
"""Freed memory at the top of the heap is handed back only past this much (a step's buffers stay)."""
TOP_PAD = 64 * MiB
"""Extra heap asked for each time it grows, so a growing step does not ask for every block."""


def keep_freed_memory() -> bool:
    """Have glibc's malloc reuse freed blocks across training steps (a no-op elsewhere).

    The process keeps up to :data:`TRIM_THRESHOLD` of freed memory for reuse instead of
    returning it at once; past that, freed memory goes back to the kernel as before.

    Returns:
        Whether the settings were applied (False on a C library other than glibc).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = all(mallopt(option, value) == 1 for option, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    if not applied:
        log.warning("mallopt refused the training allocator settings; training steps may fault in their buffers again")
    return applied
