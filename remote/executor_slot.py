"""The executor a retraining runs on, held in one slot: ``ExecutorSlot`` starts it by name
(local, parsl, globus: remote/executors.py), renews it after a dead worker, cancels a task,
switches to another by name, and waits for a task's result within a time limit."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from concurrent.futures import TimeoutError as FutureTimeout

from edgeloop.remote.errors import Aborted, RetrainError
from edgeloop.remote.executors import lost_worker, stoppable

log = logging.getLogger(__name__)


class ExecutorSlot:
    """``make(name)`` builds an executor; ``executor`` is the one in use, ``name`` its name."""

    def __init__(self, name: str, make: Callable[[str], Executor], executor: Executor | None):
        self.name = name
        self._make = make
        self.executor = executor if executor is not None else make(name)
        self._stale = False  # shut down, and no fresh one could be started yet

    def renew(self, must: bool = False) -> None:
        """Shut the executor down and start a fresh one; if that fails, the next run tries
        again (``must``: raise instead)."""
        shut(self.executor)
        self._stale = True
        try:
            self.executor = self._make(self.name)
        except Exception as exc:
            if must:
                raise RetrainError(f"cannot start the {self.name} executor: {exc}") from exc
            log.exception("cannot start the %s executor", self.name)
            return
        self._stale = False

    def ready(self) -> None:
        """A fresh executor if starting one failed before or its worker died while idle."""
        broken = getattr(self.executor, "broken", False)
        if broken:
            lost = self.executor.dead_worker() or "its worker died"
            log.warning("executor %s: %s; starting a new one", self.name, lost)
        if self._stale or broken:
            self.renew(must=True)

    def switch(self, name: str) -> None:
        """Use executor ``name`` from now on; raises (keeping the old one) if it cannot start."""
        executor = self._make(name)
        old, self.executor, self.name = self.executor, executor, name
        self._stale = False
        shut(old)

    def cancel(self, future) -> None:
        """Stop a running task by shutting its executor down (the local worker is
        terminated, Parsl's blocks are cancelled) and starting a fresh one.  A remote task
        that cannot be stopped is abandoned (its result is never used)."""
        try:
            if future.cancel():
                return
        except NotImplementedError:  # Parsl's AppFuture
            pass
        if stoppable(self.executor):
            self.renew()

    def submit(self, fn, *args):
        return self.executor.submit(fn, *args)

    def result(self, future, what: str, timeout: float, abort: threading.Event):
        """The task's result; Aborted once ``abort`` is set, RetrainError past ``timeout``
        seconds or when the task failed (naming a worker that died)."""
        deadline = time.monotonic() + timeout
        while True:
            if abort.is_set():
                self.cancel(future)
                raise Aborted(f"{what} aborted by ml:Abort")
            if time.monotonic() > deadline:
                self.cancel(future)
                raise RetrainError(
                    f"{what} exceeded its time limit of {timeout:.0f} s (remote.task_timeout_s)"
                )
            try:
                return future.result(timeout=0.2)
            except FutureTimeout:
                continue
            except Exception as exc:
                lost = lost_worker(self.executor, exc)
                if getattr(self.executor, "broken", False):
                    self.renew()
                if lost is not None:
                    raise RetrainError(f"{what} failed: {lost}") from exc
                raise RetrainError(f"{what} failed: {type(exc).__name__}: {exc}") from exc

    def shutdown(self) -> None:
        shut(self.executor)


def shut(executor: Executor) -> None:
    try:
        executor.shutdown(wait=False, cancel_futures=True)
    except Exception:
        log.exception("stopping the executor failed")
