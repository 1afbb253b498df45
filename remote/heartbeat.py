"""The retraining service's heartbeat: a counter written to ``$(P)ml:Heartbeat`` every second
from a thread of its own.  The ML IOC counts the seconds since it last changed
(``ml:HeartbeatAge``) and raises a MAJOR alarm on ``ml:Service`` ("No heartbeat") when the
service dies or hangs, so ``ml:Status`` is not trusted forever when nobody updates it."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class Heartbeat:
    """``Heartbeat(ctx, "SIM:ml:Heartbeat").start()`` ... ``.stop()``; ``ctx`` is a p4p
    client Context (thread-safe; the service's own)."""

    def __init__(self, ctx, pv: str, period_s: float = 1.0):
        self.ctx, self.pv, self.period_s = ctx, pv, period_s
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self.ctx.put(self.pv, self.beats + 1, timeout=self.period_s)
                self.beats += 1
                if failing:
                    log.info("heartbeat %s written again", self.pv)
                failing = False
            except Exception as exc:  # the IOC away: say so once, keep trying
                if not failing and not self._stop.is_set():
                    log.warning("cannot write heartbeat %s: %s", self.pv, exc)
                failing = True
            self._stop.wait(self.period_s)
