"""Waiting on a condition in the tests (edgeloop.waiting's wait_until and wait_settled do the
polling): ``wait_process_gone(pid)``."""

import psutil

from edgeloop.waiting import wait_until


def wait_process_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once the process has exited (gone, or a zombie not reaped yet by its parent)."""

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    try:
        return wait_until(gone, timeout, f"process {pid} to exit")
    except TimeoutError:
        return False
