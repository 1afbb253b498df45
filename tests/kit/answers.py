"""Frames in and answers out over pvAccess: ``post`` (a frame on a p4p SharedPV) and
``Collector`` (every update of an NTNDArray PV, waited for by count or by uniqueId)."""

import threading
import time

from edgeloop import ntnd


def post(source, value):
    """Post a frame on a SharedPV, opening it with the first."""
    if source.isOpen():
        source.post(value)
    else:
        source.open(value)


class Collector:
    """All updates of an NTNDArray PV (p4p monitor, pipelined so none are squashed)."""

    def __init__(self, ctx, pv):
        self.frames, self.lock = [], threading.Lock()
        self.connected = threading.Event()
        self.sub = ctx.monitor(pv, self._on, request="field()record[pipeline=true,queueSize=64]")

    def _on(self, value):
        if isinstance(value, Exception):
            return
        self.connected.set()
        if value["uniqueId"] > 0:  # 0: the placeholder
            with self.lock:
                self.frames.append(ntnd.decode(value))

    def _poll(self, done, timeout) -> list:
        """The frames so far, once ``done(frames)`` holds or at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                frames = list(self.frames)
            if done(frames) or time.monotonic() > deadline:
                return frames
            time.sleep(0.05)

    def wait(self, n, timeout=60):
        return self._poll(lambda frames: len(frames) >= n, timeout)

    def wait_ids(self, uids, timeout=60) -> dict:
        """The frames of these uniqueIds, once all have come (or at the timeout); answers to
        other frames, such as a late one to an earlier test, do not count."""
        wanted = set(uids)

        def pick(frames) -> dict:
            return {f.unique_id: f for f in frames if f.unique_id in wanted}

        return pick(self._poll(lambda frames: len(pick(frames)) == len(wanted), timeout))

    def close(self):
        self.sub.close()
