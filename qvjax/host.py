"""Host-process settings that speed up XLA:CPU.

XLA:CPU allocates each execution's temporaries and outputs with malloc. glibc
serves blocks above its mmap threshold (at most 32 MiB) with fresh mmaps and
returns them on free, so every step's large buffers page-fault again on first
touch: writing a new 32 MiB array ran at ~2 GB/s here instead of ~11 GB/s,
and QV's decode step (which writes rotated keys for the whole cache) was
~25% slower (docs/performance.md). `keep_freed_memory` makes glibc serve
them from the heap and keep freed memory for reuse.
"""

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
  """Large allocations from the heap, freed memory kept (glibc only; a no-op
  elsewhere). The process's resident memory then stays at its peak. Returns
  whether the settings took."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:  # musl and others: nothing to tune.
    return False
  return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
