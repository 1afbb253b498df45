"""``release_freed_memory()``: hand back to the OS what a retraining freed.

glibc's malloc keeps freed memory in the arena of the thread that used it, and the
retraining thread's peak (the labels read for the held-out check, the models' tensors)
grows with the training set.  Measured with the labels of a 60-minute soak's 15
retrainings, read in a thread as the service does: the process held 857 MB after them
without a trim, 599 MB with one after each (and the soak's service grew 582 -> 1,904 MB).
``malloc_trim(0)`` returns the free pages of every arena, as dask's workers do; elsewhere
than glibc it does nothing."""

from __future__ import annotations

import ctypes
import ctypes.util


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def release_freed_memory() -> bool:
    """True where glibc returned something to the OS."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))
