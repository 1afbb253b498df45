"""Bounded hand-off between the monitor callback and the inference thread."""

from __future__ import annotations

import collections
import threading


class FrameQueue:
    """A full queue drops its oldest item (counted in ``dropped``); ``put`` never blocks."""

    def __init__(self, maxlen: int):
        if maxlen < 1:
            raise ValueError("queue size must be >= 1")
        self._items: collections.deque = collections.deque()
        self._maxlen = maxlen
        self._cond = threading.Condition()
        self.received = 0
        self.dropped = 0

    def put(self, item) -> None:
        with self._cond:
            self.received += 1
            if len(self._items) >= self._maxlen:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify()

    def get_batch(self, max_items: int, timeout: float) -> list:
        """Everything queued, up to ``max_items``; waits up to ``timeout`` for the first."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            n = min(max_items, len(self._items))
            return [self._items.popleft() for _ in range(n)]

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
