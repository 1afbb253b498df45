"""The edge's PV set, the same for one edge and for the workers' aggregate: ``EdgePvs``
(edge:Phase, :Amplitude, :PhaseMap, :Peaks, :Mode, :Message, :LoadModel and the scalars of
edge_pva/scalars.py), and ``LoadRequests``, the queue behind edge:LoadModel and the loop that
answers each put."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import numpy as np
from p4p.nt import NTScalar
from p4p.server import Server
from p4p.server.thread import SharedPV

from edgeloop import ntnd
from edgeloop.config import Config
from edgeloop.edge_pva.access import LoadModelPut
from edgeloop.edge_pva.peak_tables import NO_PEAKS, peak_table
from edgeloop.edge_pva.scalars import ScalarPVs

log = logging.getLogger(__name__)


class LoadRequests:
    """edge:LoadModel's puts, each answered by ``load(version)``: None once the version
    serves, else the reason it does not (the put fails with it); a worker's RevertModel
    puts, in the same order, by ``revert(version)``."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()

    def serve(
        self,
        load: Callable[[int], str | None],
        stop: threading.Event,
        revert: Callable[[int], str | None] | None = None,
    ) -> None:
        answer = {"load": load, "revert": revert}
        while not stop.is_set():
            try:
                action, version, op = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                op.done(error=answer[action](version))
            except Exception as exc:  # never let the loader thread die
                log.exception("model %s failed", action)
                op.done(error=f"model v{version} {action} failed: {exc}")


class EdgePvs:
    """The served PVs by name (``pvs``), their scalars (``scalars``), and ``message``."""

    def __init__(self, cfg: Config, mode: str, loads: LoadRequests):
        def image(size):
            return SharedPV(initial=ntnd.build(np.zeros((size, size), np.float32), 0))

        self.scalars = ScalarPVs(cfg.edge, mode)
        self.pvs: dict[str, SharedPV] = {
            "Phase": image(cfg.model.input_size),
            "Amplitude": image(cfg.model.input_size),
            "PhaseMap": image(cfg.edge.map_size),
            "Peaks": SharedPV(initial=peak_table(0, NO_PEAKS)),
            "Mode": SharedPV(nt=NTScalar("s"), initial=mode),
            "Message": SharedPV(nt=NTScalar("s"), initial="starting"),
            "LoadModel": SharedPV(
                nt=NTScalar("l"), initial=0, handler=LoadModelPut(loads.queue, cfg.security)
            ),
            **self.scalars.pvs,
        }

    def __getitem__(self, name: str) -> SharedPV:
        return self.pvs[name]

    def message(self, text: str, severity: int = 0, logged: bool = True) -> None:
        """edge:Message (at most 500 characters) with its alarm severity, and the log."""
        if logged:
            {0: log.info, 1: log.warning}.get(severity, log.error)(text)
        self.pvs["Message"].post(text[:500], severity=severity)

    def server(self, pv_prefix: str, extra: dict | None = None, **server_args) -> Server:
        """A p4p server of these PVs (and ``extra``) under ``pv_prefix``; ``server_args``
        go to p4p's Server (``isolate=True`` for a test's private network)."""
        names = {f"{pv_prefix}{k}": pv for k, pv in {**self.pvs, **(extra or {})}.items()}
        return Server(providers=[names], **server_args)
