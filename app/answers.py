"""The edge's answers as a client sees them, for the demos, the benchmarks and the tests:
``AnswerCollector`` (every update of an output PV, pipelined so none are squashed, by the
input frame's uniqueId; edge:Phase frames by default) and ``PeakCollector`` (edge:Peaks
tables as dicts of numpy columns)."""

from __future__ import annotations

import threading
import time

import numpy as np
from p4p.client.thread import Context

from edgeloop import ntnd
from edgeloop.waiting import wait_until

REQUEST = "field()record[pipeline=true,queueSize=64]"


class AnswerCollector:
    """``frames``: the answers in arrival order; ``items``: the latest by uniqueId (what
    :meth:`take` hands over)."""

    def __init__(self, ctx: Context, pv: str):
        self.pv = pv
        self.lock = threading.Lock()
        self.frames: list = []
        self.items: dict = {}
        self.connected = threading.Event()  # the PV's first value came: the monitor is live
        self.sub = ctx.monitor(pv, self._on, request=REQUEST)

    def _parse(self, value) -> tuple[int, object]:
        frame = ntnd.decode(value)
        return frame.unique_id, frame

    def _on(self, value) -> None:
        if isinstance(value, Exception):
            return
        self.connected.set()
        uid, item = self._parse(value)
        if uid > 0:  # 0: the placeholder before the first frame
            with self.lock:
                self.frames.append(item)
                self.items[uid] = item

    def wait_connected(self, timeout: float = 10.0) -> AnswerCollector:
        """Once the monitor is live (so no answer posted from now on is missed)."""
        wait_until(self.connected.is_set, timeout, f"a monitor of {self.pv}")
        return self

    def _poll(self, done, timeout: float) -> None:
        def holds() -> bool:
            with self.lock:
                return done()

        try:
            wait_until(holds, timeout, f"answers on {self.pv}")
        except TimeoutError:
            pass  # what came is returned; the caller says what was missing

    def wait(self, n: int, timeout: float = 60) -> list:
        """The answers so far, once there are ``n`` (or at the timeout)."""
        self._poll(lambda: len(self.frames) >= n, timeout)
        with self.lock:
            return list(self.frames)

    def wait_ids(self, uids, timeout: float = 60) -> dict:
        """The answers to these uniqueIds, once all have come (or at the timeout); answers
        to other frames, such as a late one to an earlier request, do not count."""
        wanted = {int(u) for u in uids}
        self._poll(lambda: wanted <= set(self.items), timeout)
        with self.lock:
            return {u: self.items[u] for u in wanted if u in self.items}

    def take(self, expected, timeout: float) -> dict:
        """Wait for the answers to the uniqueIds in ``expected`` (or for ``expected``
        answers when it is an int); return what arrived and start afresh."""
        if isinstance(expected, int):
            self._poll(lambda: len(self.items) >= expected, timeout)
        else:
            wanted = {int(u) for u in expected}
            self._poll(lambda: wanted <= set(self.items), timeout)
        with self.lock:
            out, self.items, self.frames = self.items, {}, []
        return out

    def close(self) -> None:
        self.sub.close()


class PeakCollector(AnswerCollector):
    """Every ``edge:Peaks`` NTTable, by frame uniqueId (the table's ``timeStamp.userTag``,
    set also for a frame with no peaks); each table as a dict of numpy columns."""

    def _parse(self, value) -> tuple[int, dict[str, np.ndarray]]:
        # p4p gives None for an empty column of a local Value, [] to a client; both mean 0 rows
        columns = {
            k: np.asarray(value["value"][k] if value["value"][k] is not None else [])
            for k in value["labels"]
        }
        # when the frame was taken (the edge keeps its time stamp) and when this arrived
        columns["stamps"] = (ntnd.epoch_seconds(value), time.time())
        return int(value["timeStamp.userTag"]), columns
