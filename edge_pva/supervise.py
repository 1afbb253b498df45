"""Worker threads that are restarted when they die, and give up when they keep dying."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Supervisor:
    """Runs each worker in a thread; a worker that raises is reported through ``on_death``
    and restarted after ``backoff_s``, unless it died ``max_deaths`` times within
    ``window_s``: then ``on_fatal`` is called once and nothing more is restarted."""

    def __init__(
        self,
        stop: threading.Event,
        on_death: Callable[[str, BaseException], None],
        on_fatal: Callable[[str], None],
        max_deaths: int = 5,
        window_s: float = 60.0,
        backoff_s: float = 0.5,
    ):
        self._stop = stop
        self._on_death, self._on_fatal = on_death, on_fatal
        self._max_deaths, self._window_s, self._backoff_s = max_deaths, window_s, backoff_s
        self._deaths: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.deaths = 0
        self.failed: str | None = None

    def start(self, target: Callable[[], None], name: str | None = None) -> threading.Thread:
        name = name or target.__name__.strip("_")
        thread = threading.Thread(target=self._run, args=(target, name), name=name, daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def _run(self, target: Callable[[], None], name: str) -> None:
        while not self._stop.is_set() and self.failed is None:
            try:
                target()
                return
            except Exception as exc:
                log.exception("edge thread %s died", name)
                if not self._record_death(name, exc):
                    return
                self._stop.wait(self._backoff_s)

    def _record_death(self, name: str, exc: BaseException) -> bool:
        """Whether the worker may be restarted."""
        now = time.monotonic()
        with self._lock:
            self.deaths += 1
            self._deaths.append(now)
            while now - self._deaths[0] > self._window_s:
                self._deaths.popleft()
            fatal = len(self._deaths) >= self._max_deaths and self.failed is None
            if fatal:
                self.failed = (
                    f"edge thread {name} died {len(self._deaths)} times in "
                    f"{self._window_s:.0f} s, last: {type(exc).__name__}: {exc}"
                )
        self._on_death(name, exc)
        if fatal:
            self._on_fatal(self.failed)
        return self.failed is None

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            thread.join(timeout)
