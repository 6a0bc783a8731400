"""Keep freed memory in the process for the next step, instead of handing it back to the OS.

torch allocates its CPU tensors through the C library's malloc. With glibc's defaults a block of more
than a few hundred KiB is mapped from the OS for the tensor and unmapped when it is freed, and freed
memory at the top of the heap is returned as well; the next training step then asks for the same
sizes again, and the kernel zero-fills every 4 KiB page of them on first touch. On the `bench` prior
(batch 16, 256 tokens) that was 15,000–52,000 page faults and up to 0.19 s of system time per
step, a tenth of it (docs/performance.md, "Memory the OS takes back").

`keep_freed_memory()` turns both off (malloc's M_MMAP_MAX = 0 and a 2 GiB M_TRIM_THRESHOLD): every
block comes from the heap and a freed one waits there for the next tensor of its size. The process
then holds on to its peak heap between steps, which a training or sampling run reaches again at its
next step anyway. The `vqtool` command calls it at start-up; a Python caller of the stage functions
may call it too. `VQTOOL_KEEP_MEMORY=0` in the environment leaves glibc's defaults. Elsewhere (macOS,
musl, Windows) it does nothing: only glibc has these settings.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

SWITCH = "VQTOOL_KEEP_MEMORY"  # "0": glibc's own mapping and trimming

# mallopt(3) parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # the largest an int allows: only a freed top of the heap above 2 GiB goes back


@functools.cache
def _mallopt():
    """glibc's mallopt, or None where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Set malloc to keep freed memory for reuse (see the module doc); True when the settings took."""
    if os.environ.get(SWITCH, "1") == "0":
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # mallopt returns 1 on success, 0 on a value it refuses.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
