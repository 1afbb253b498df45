"""Bounded hand-off between the monitor callback and the inference thread, and the one
account of every frame the edge took in."""

from __future__ import annotations

import collections
import re
import threading


class FrameQueue:
    """A full queue drops its oldest item; ``put`` never blocks. Full: ``maxlen`` items, or
    items whose sizes (given to ``put``) would add up to more than ``max_bytes``.

    Every frame taken in is settled exactly once, as answered, dropped or bad; until then it
    is in flight (queued or being handled).  All counts change under one lock, so a
    :meth:`counts` snapshot always satisfies ``in = out + dropped + bad + in_flight``.
    Refusal reasons are kept for the rate-limited summary (:meth:`take_reasons`).
    """

    def __init__(self, maxlen: int, max_bytes: int | None = None):
        if maxlen < 1:
            raise ValueError("queue size must be >= 1")
        self._items: collections.deque = collections.deque()  # (item, its size in bytes)
        self._maxlen = maxlen
        self._max_bytes = max_bytes
        self.queued_bytes = 0
        self._cond = threading.Condition()
        self.received = 0
        self.dropped = 0
        self.answered = 0
        self.bad = 0
        # refusals since the last summary, by reason with its numbers blanked out
        self._reasons: collections.Counter = collections.Counter()
        self._examples: dict[str, tuple] = {}  # -> (a uniqueId, its reason, severity)

    def put(self, item, nbytes: int = 0) -> None:
        with self._cond:
            self.received += 1
            while self._items and (
                len(self._items) >= self._maxlen
                or (self._max_bytes is not None and self.queued_bytes + nbytes > self._max_bytes)
            ):
                self.queued_bytes -= self._items.popleft()[1]
                self.dropped += 1
            self._items.append((item, nbytes))
            self.queued_bytes += nbytes
            self._cond.notify()

    def refuse(self, unique_id, reason: str, severity: int = 1) -> None:
        """A frame refused before it was queued: taken in and settled as bad at once."""
        with self._cond:
            self.received += 1
            self._bad(unique_id, reason, severity)

    def get_batch(self, max_items: int, timeout: float) -> list:
        """Everything queued, up to ``max_items``; waits up to ``timeout`` for the first."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            batch = [self._items.popleft() for _ in range(min(max_items, len(self._items)))]
            self.queued_bytes -= sum(nbytes for _, nbytes in batch)
            return [item for item, _ in batch]

    def settle_answered(self, n: int = 1) -> None:
        with self._cond:
            self.answered += n

    def settle_bad(self, unique_id, reason: str, severity: int = 1) -> None:
        with self._cond:
            self._bad(unique_id, reason, severity)

    def _bad(self, unique_id, reason: str, severity: int) -> None:
        self.bad += 1
        key = re.sub(r"\d+", "#", reason)
        self._reasons[key] += 1
        self._examples.setdefault(key, (unique_id, reason, severity))

    def take_reasons(self) -> list[tuple[int, object, str, int]]:
        """(count, an example's uniqueId, its reason, severity) of each kind of refusal
        since the last call, the most frequent first."""
        with self._cond:
            out = [(n, *self._examples[k]) for k, n in self._reasons.most_common()]
            self._reasons.clear()
            self._examples.clear()
        return out

    def counts(self) -> dict[str, int]:
        with self._cond:
            settled = self.answered + self.dropped + self.bad
            return {
                "in": self.received,
                "out": self.answered,
                "dropped": self.dropped,
                "bad": self.bad,
                "in_flight": self.received - settled,
            }

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
