"""This process's memory as the kernel counts it (``/proc/self/status``), for RAM-ceiling decisions and reports.

``VmRSS`` is resident memory now and ``VmHWM`` its high-water mark. ``RssAnon`` is the anonymous part (heap,
interpreter arena): pages of the model file mapped from disk count in VmRSS too, but the kernel can drop them
under pressure, so both are reported.
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

MIB = 1 << 20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's default starting value, made fixed
_tuned = False


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold at 128 KiB, so large blocks are always mapped and unmapped when freed.

    By default glibc raises the threshold to the size of each mapped block freed (up to 32 MiB), after which the
    interpreter's large temporary buffers come from the heap, which fragments and is not given back: a
    MobileNetV2 224² ``train_features`` step (last 20 layers, batch 32) grew from 363 to 402 MiB VmHWM over its
    first three steps, and stays at 333 MiB with the threshold fixed (docs/bench.md). Called once per process,
    before an interpreter is created; returns False where there is no glibc ``mallopt`` (the call is skipped).
    """
    global _tuned
    if _tuned:
        return True
    try:
        libc = ctypes.CDLL(None)
        _tuned = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
    return _tuned


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``, ``RssAnon``) in bytes.

    Raises:
        RuntimeError: the field is not there (not Linux).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    """Resident set size now."""
    return status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    return status_bytes("VmHWM")


def anon_rss_bytes() -> int:
    """Anonymous resident memory now (what the kernel cannot reclaim without killing the process)."""
    return status_bytes("RssAnon")


def trim_heap() -> None:
    """Give the heap's free memory back to the system (glibc ``malloc_trim``; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
