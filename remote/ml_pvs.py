"""The retraining service's side of the ML IOC's ``$(P)ml:*`` records: ``MlPvs`` writes them
(and writes its state again when the IOC restarts), reports a retraining's steps and figures
(it is the pipeline's ``Progress``), and turns writes to the buttons, ``ml:Request`` and
``ml:Endpoint`` into calls."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from p4p.client.thread import Context, Disconnected

from edgeloop.config import search_hint

log = logging.getLogger(__name__)

STATES = ["Idle", "Staging", "Analyzing", "Training", "Validating", "Deploying", "Error"]
# coarse $(P)ml:Progress (%) at the start of each state; Error keeps the last value
PROGRESS = {
    "Idle": 100.0,
    "Staging": 0.0,
    "Analyzing": 5.0,
    "Training": 35.0,
    "Validating": 90.0,
    "Deploying": 95.0,
}
# reset by the service, not state it keeps
BUTTONS = ("ml:Retrain", "ml:Abort", "ml:Rollback")
TIMING_PVS = {
    "staging_s": "ml:StagingTime",
    "analysis_s": "ml:AnalysisTime",
    "training_s": "ml:TrainingTime",
    "return_s": "ml:ReturnTime",
    "end_to_end_s": "ml:EndToEndTime",
}
# a retraining's figures (pipeline.Progress.record) -> record, and how it is written
FIGURES = {
    "trigger": ("ml:Trigger", lambda v: v[:250]),
    "val_loss": ("ml:ValLoss", float),
    "model_version": ("ml:ModelVersion", int),
}


def fresh_values(callback: Callable[[object, bool], None]):
    """Monitor callback calling ``callback(value, first)``: ``first`` for the value a PV
    holds when the monitor (re)connects, which nobody wrote while it was watched;
    disconnections and errors are dropped."""
    fresh = [True]

    def on_value(value) -> None:
        if isinstance(value, Disconnected):
            fresh[0] = True
            return
        if isinstance(value, Exception):
            return
        first, fresh[0] = fresh[0], False
        callback(value, first)

    return on_value


class MlPvs:
    def __init__(self, ctx: Context, prefix: str):
        self.ctx, self.p = ctx, prefix
        self._state: dict = {}  # what the service last wrote to each of its PVs
        self._lock = threading.Lock()
        self._ioc_seen = False
        self._subs: list = []
        self._connected: dict[str, threading.Event] = {}  # PV -> its first value came

    # ---- writing -------------------------------------------------------------------------
    def put(self, name: str, value) -> None:
        """Write one of the service's PVs, and keep the value to write again when the IOC
        comes back from a restart."""
        with self._lock:
            if name not in BUTTONS:
                self._state[name] = value
            self._write(name, value)

    def keep(self, name: str, value) -> None:
        """Remember a value a PV holds already (written back after an IOC restart)."""
        with self._lock:
            self._state[name] = value

    def _write(self, name: str, value) -> None:
        try:
            self.ctx.put(f"{self.p}{name}", value, timeout=5)
        except Exception as exc:
            log.error("cannot write %s%s: %s (%s)", self.p, name, exc, search_hint())

    def restore(self) -> None:
        with self._lock:
            for name, value in self._state.items():
                self._write(name, value)
        if self._ioc_seen:
            log.warning("the ML IOC is back: its state written again (%s)", ", ".join(self._state))
        self._ioc_seen = True

    def status(self, state: str, message: str | None = None) -> None:
        self.put("ml:Status", {"value.index": STATES.index(state)})
        if state in PROGRESS:
            self.put("ml:Progress", PROGRESS[state])
        if message is not None:
            log.log(logging.ERROR if state == "Error" else logging.INFO, "%s: %s", state, message)
            self.put("ml:Message", message[:500])

    def message(self, text: str) -> None:
        self.put("ml:Message", text)

    def publish_timings(self, timings: dict) -> None:
        for key, pv in TIMING_PVS.items():
            if key in timings:
                self.put(pv, timings[key])
        log.info(
            "retraining timings: %s", json.dumps({k: round(v, 2) for k, v in timings.items()})
        )

    # the pipeline's Progress
    def enter(self, state: str, message: str) -> None:
        self.status(state, message)

    def record(self, name: str, value) -> None:
        pv, convert = FIGURES[name]
        self.put(pv, convert(value))

    # ---- reading -------------------------------------------------------------------------
    def monitor(self, name: str, callback) -> None:
        """Watch ``$(P)name``; disconnects too (ml:Endpoint's tell the IOC restarted)."""
        connected = self._connected[name] = threading.Event()

        def on_value(value) -> None:
            if not isinstance(value, Exception):
                connected.set()
            callback(value)

        self._subs.append(self.ctx.monitor(f"{self.p}{name}", on_value, notify_disconnect=True))

    def wait_connected(self, timeout: float) -> list[str]:
        """Wait until every watched PV has sent its first value; the ones that did not."""
        deadline = time.monotonic() + timeout
        for event in self._connected.values():
            event.wait(max(0.0, deadline - time.monotonic()))
        return [name for name, event in self._connected.items() if not event.is_set()]

    def button(self, name: str, action: Callable[[], None]):
        """Monitor callback of a bo 'button': on 1, reset it and run ``action``. A 1 the
        button held when the service (re)connected was written while nobody watched it
        (the service down, the IOC restarting): reset, said in ml:Message, not acted on."""

        def on_value(value, latched: bool) -> None:
            if int(value["value.index"]) != 1:
                return
            threading.Thread(target=self.put, args=(name, {"value.index": 0}), daemon=True).start()
            if latched:
                text = (
                    f"{name} was set while the service was not watching it: ignored (set it again)"
                )
                log.warning(text)
                threading.Thread(target=self.message, args=(text,), daemon=True).start()
                return
            action()

        return fresh_values(on_value)

    def executor_watcher(self, current: Callable[[], str], choose: Callable[[str], None]):
        """Monitor callback of ``ml:Endpoint``: a write naming another executor than
        ``current()`` calls ``choose(name)`` in a thread of its own; the first value after a
        (re)connection is what the IOC started with (after a restart its db default), not an
        operator's choice, so the service's state is written back instead."""
        lost = [False]

        def on_value(value) -> None:
            if isinstance(value, Disconnected):
                lost[0] = True
                return
            if isinstance(value, Exception):
                return
            if lost[0]:
                lost[0] = False
                threading.Thread(target=self.restore, name="restore", daemon=True).start()
                return
            name = str(value["value"]).strip()
            if name != current():
                threading.Thread(target=choose, args=(name,), daemon=True).start()

        return on_value

    def request_watcher(self, request: Callable[[str], object]):
        """Monitor callback of ``ml:Request``: any write of a non-empty reason is a trigger
        with that source; what the record held before we connected is not a request."""

        def on_value(value, first: bool) -> None:
            reason = str(value["value"]).strip()
            if reason and not first:
                request(f"{reason} (ml:Request)")

        return fresh_values(on_value)

    def close(self) -> None:
        for sub in self._subs:
            sub.close()
        self._subs.clear()
