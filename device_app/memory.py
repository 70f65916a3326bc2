"""This process's memory as the kernel counts it (``/proc/self/status``), for RAM-ceiling decisions and reports.

``VmRSS`` is resident memory now and ``VmHWM`` its high-water mark. ``RssAnon`` is the anonymous part (heap,
interpreter arena): pages of the model file mapped from disk count in VmRSS too, but the kernel can drop them
under pressure, so both are reported.
"""

from __future__ import annotations

from pathlib import Path

MIB = 1 << 20


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
