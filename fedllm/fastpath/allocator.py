"""The C allocator setting of a training process: ``keep_freed_memory``.

Part of the fast path (``fedllm.fastpath``): only the training loop calls it, through the
``FastPath`` that ``fedllm.fastpath.enable`` returns, and only with ``train.fast-path = true``; with
the switch off a process runs with glibc's default allocator. It changes how fast memory is
handed out, never a value.
"""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_allocator_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process for reuse (once per process; returns
    whether it is in effect).

    By default glibc serves blocks above a threshold (128 KiB, raised dynamically to at most
    32 MiB) with fresh ``mmap`` pages and returns them on ``free``; a training step allocates and
    frees hundreds of activation tensors of 1-12 MB, and every new one page-faults its memory in
    again (zero-filled by the kernel). With both thresholds raised, freed blocks are reused:
    SmolLM2-135M, bf16, 8 x 128 tokens, 2 threads: a DP step about 10% faster, peak RSS unchanged
    (``bench/bench_speed.py``). The process keeps its peak memory until it exits, which is what a
    site process does anyway. No effect, and ``False``, off glibc."""
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
                _allocator_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31))
            except (OSError, AttributeError):
                pass
    return _allocator_tuned
