"""Executors for the retraining steps: any ``concurrent.futures.Executor`` works; names in
configuration map to one here."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor


class LocalExecutor(ProcessPoolExecutor):
    """One worker process, spawned (a fresh interpreter: no inherited server threads or
    sockets), that can be stopped in the middle of a task."""

    def __init__(self):
        super().__init__(max_workers=1, mp_context=multiprocessing.get_context("spawn"))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop; with ``wait=False`` a running task's worker is terminated, not left to
        finish as an orphan."""
        if not wait:
            for proc in list((self._processes or {}).values()):
                proc.terminate()
        super().shutdown(wait=wait, cancel_futures=cancel_futures)


def local_executor() -> Executor:
    return LocalExecutor()


EXECUTORS = {"local": local_executor}


def make_executor(name: str) -> Executor:
    try:
        return EXECUTORS[name]()
    except KeyError:
        raise ValueError(f"unknown executor {name!r}; available: {sorted(EXECUTORS)}") from None
