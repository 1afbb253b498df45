"""Waiting on a condition, never on a fixed sleep: ``wait_process_gone(pid)``."""

import time

import psutil


def wait_process_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once the process has exited (gone, or a zombie not reaped yet by its parent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False
