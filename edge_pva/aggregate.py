"""The one set of ``{prefix}edge:*`` PVs of an edge that runs as N workers.

The workers (edge_pva/workers.py) share the detector stream through the source's data
distributor and each serves ``{prefix}edge:wK:*``.  The aggregate republishes their answers:

- edge:Phase, :Amplitude, :Peaks: each answer as the worker posted it, each (uniqueId,
  timeStamp) once, from the first worker that answered it; a later answer to the same frame
  by another worker (a source without the distributor sends every frame to every worker) is
  counted in Repeats, and said once in Message.
- edge:PhaseMap: one map stitched from the Phase frames at their SampleX/SampleY
  attributes; edge:Consistency/ScanConsistency (ptychography) from that map's overlap
  disagreement and each frame's ConsistencyData attribute, as one edge computes them; HEDM:
  the workers' figures, weighted by the frames each answered.
- FramesIn, FramesOut, Dropped, BadFrames, InFlight, Repeats, Restarts: the workers' sums
  (read from one poll of each worker, across worker restarts), less the copies, so
  FramesIn = FramesOut + Dropped + BadFrames + InFlight still holds; MissedFrames from a
  witness monitor of the source (uniqueId and timeStamp only); FrameRate counted here;
  LatencyMs the slowest worker's; DroppedRate the sum; ModelVersion the oldest serving.
- Message: the aggregate's own, and each worker's prefixed with its name.
- edge:LoadModel: every worker loads the version, or none serves it (edge_pva/
  worker_deploy.py); the aggregate alone records it accepted or rejected in the registry.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from functools import partial

from p4p import Value
from p4p.client.thread import Context, Disconnected

from edgeloop import ntnd
from edgeloop.config import MODES, Config
from edgeloop.edge_pva.edge_pvs import EdgePvs, LoadRequests
from edgeloop.edge_pva.label_free import combine
from edgeloop.edge_pva.stitch import Stitcher, finite_position
from edgeloop.edge_pva.worker_deploy import WorkerDeploy
from edgeloop.edge_pva.workers import POLLED, WorkerCounts, group_name, worker_pv_prefix
from edgeloop.frame_ids import AcquisitionOrder, FrameIds
from edgeloop.registry import Registry

log = logging.getLogger(__name__)

ANSWERS = {"Phase": "ptycho", "Amplitude": "ptycho", "Peaks": "hedm"}
PRIMARY = ("Phase", "Peaks")  # one per answered frame
# the workers' answers: pipelined, so a burst is not squashed
ANSWER_REQUEST = "field()record[pipeline=true,queueSize=256]"
WITNESS_REQUEST = "field(uniqueId,timeStamp)record[queueSize=256]"
OWNERS_KEPT = 16384  # frames remembered (which worker answered them)


def _stamp(value) -> tuple[int, int]:
    ts = value["timeStamp"]
    return int(ts["secondsPastEpoch"]), int(ts["nanoseconds"])


class EdgeAggregate:
    def __init__(
        self,
        cfg: Config,
        workers: int,
        input_pv: str | None = None,
        plugin: str = "distributor",
    ):
        self.cfg, self.n = cfg, workers
        self.prefix = cfg.prefix
        self.input_pv = input_pv or f"{cfg.prefix}det:Pva1:Image"
        self.plugin = plugin
        self.workers = {k: worker_pv_prefix(cfg.prefix, k) for k in range(1, workers + 1)}
        self._lock = threading.Lock()
        self._owners: collections.OrderedDict = collections.OrderedDict()  # frame -> worker
        self.source = FrameIds(numbered=True)  # the witness's: skipped frames, acquisitions
        self.order = AcquisitionOrder()  # of the frames answered, out of order
        self.duplicates = 0
        self._said_copies = False
        self.counts = WorkerCounts()
        self._polled: dict[int, dict] = {}
        self._poll_lock = threading.Lock()
        self._away: dict[int, float] = {}  # worker -> since when it has not answered
        self._started = time.monotonic()
        self.startup_grace_s = 120.0  # a worker starting (torch, model) is not missing yet
        self.answered_by: collections.Counter = collections.Counter()  # worker -> frames
        self.mode = cfg.mode
        self.stitcher = Stitcher(cfg)  # ptychography's figures, from the stitched map
        self._out_times: collections.deque = collections.deque(maxlen=20000)
        self._fresh: set = set()  # subscriptions whose next update is the value on connect
        self.loads = LoadRequests()
        self._stop = threading.Event()
        self.pvs = EdgePvs(cfg, self.mode, self.loads)
        self._types = {kind: self.pvs[kind].current().type() for kind in ANSWERS}
        self._server = None
        self._ctx = None
        self._subs: list = []
        self._threads: list[threading.Thread] = []

    def message(self, text: str, severity: int = 0) -> None:
        self.pvs.message(text, severity)

    # ---- answers -------------------------------------------------------------------------
    def _subscribe(self, name: str, callback, request: str) -> None:
        key = len(self._subs)
        self._fresh.add(key)
        self._subs.append(
            self._ctx.monitor(
                name,
                lambda value: self._on_update(key, callback, value),
                request=request,
                notify_disconnect=True,
            )
        )

    def _on_update(self, key: int, callback, value) -> None:
        """The update a monitor gets on (re)connecting is the PV's value then, not news."""
        if isinstance(value, Exception):
            if isinstance(value, Disconnected):
                self._fresh.add(key)
            return
        if key in self._fresh:
            self._fresh.discard(key)
            return
        try:
            callback(value)
        except Exception:
            log.exception("aggregate: update not handled")

    def _on_answer(self, k: int, kind: str, value) -> None:
        uid = int(value["timeStamp.userTag"] if kind == "Peaks" else value["uniqueId"])
        if uid == 0:
            return
        stamp = _stamp(value)
        frame = (uid, stamp)
        with self._lock:
            owner = self._owners.get(frame)
            if owner is None:
                self._owners[frame] = owner = k
                while len(self._owners) > OWNERS_KEPT:
                    self._owners.popitem(last=False)
                acquisition = self.source.acquisition_of(uid, stamp)
                current, new_acquisition = self.order.arrival(uid, stamp, acquisition)
                if new_acquisition:
                    self.stitcher.new_acquisition()
            else:
                current = self.order.current(stamp, self.source.acquisition_of(uid, stamp))
            if owner != k:
                if kind in PRIMARY:
                    self.duplicates += 1
                    self._copies_seen()
                return
            if kind in PRIMARY:
                self.answered_by[k] += 1
        if kind == "Phase":
            self._stitch(value, current)
        elif kind == "Peaks":
            self.pvs.scalars.post("PeakCount", len(value["value.x"]))
        # a copy in the served PV's own type (a server posts only the type it opened with)
        self.pvs[kind].post(Value(self._types[kind], value))
        if kind in PRIMARY:
            self._out_times.append(time.monotonic())
            self._set_mode(ANSWERS[kind])

    def _copies_seen(self) -> None:
        if self._said_copies or self.duplicates <= 2 * self.n:  # a worker that (re)connects
            return  # mid-stream answers the frame the source holds again: expected
        self._said_copies = True
        self.message(
            f"{self.input_pv} does not distribute frames between the {self.n} workers "
            f"(no '{self.plugin}' plugin: not a pvDatabase server, or too old): every worker "
            "gets every frame; each is answered once here and the copies counted in Repeats, "
            "so the workers add no throughput (run the edge with --workers 1)",
            severity=1,
        )

    def _stitch(self, value, current: bool) -> None:
        try:
            frame = ntnd.decode(value)
        except ntnd.FrameError as exc:
            log.warning("aggregate: Phase uniqueId %s not decoded: %s", value["uniqueId"], exc)
            return
        attrs = frame.attributes
        xy = finite_position(attrs) if current else None
        figure = None
        if xy is not None:
            overlap, _ = self.stitcher.place(frame.data, xy)
            figure = combine(overlap, attrs.get("ConsistencyData"))
        if figure is None:
            figure = attrs.get("Consistency")
        if current:
            self.stitcher.add(figure)

    def _set_mode(self, mode: str) -> None:
        if mode == self.mode or mode not in MODES:
            return
        self.mode = mode
        self.stitcher.reset_figures(lambda: self.pvs.scalars.set_mode(mode))
        self.pvs["Mode"].post(mode)

    def _on_message(self, k: int, value) -> None:
        self.pvs.message(f"w{k}: {value['value']}", int(value["alarm.severity"]), logged=False)

    def _on_source(self, value) -> None:
        uid = int(value["uniqueId"])
        if uid:
            self.source.arrival(uid, _stamp(value))

    # ---- statistics ----------------------------------------------------------------------
    def _poll(self) -> None:
        """Each worker's counters and state, from one read of each."""
        with self._poll_lock:
            self._poll_workers()

    def _poll_workers(self) -> None:
        names = [p + n for p in self.workers.values() for n in POLLED]
        values = self._ctx.get(names, timeout=2.0, throw=False)
        now = time.monotonic()
        for i, (k, prefix) in enumerate(self.workers.items()):
            got = values[i * len(POLLED) : (i + 1) * len(POLLED)]
            if any(isinstance(v, Exception) for v in got):
                self._polled.pop(k, None)
                since = self._away.setdefault(k, now)
                known = k in self.counts.current or now - self._started > self.startup_grace_s
                if known and since > 0 and now - since > 5.0:
                    self._away[k] = -1.0  # said
                    self.message(f"worker {k} ({prefix}*) not answering", severity=2)
                continue
            if self._away.pop(k, 0.0) < 0:
                self.message(f"worker {k} ({prefix}*) answering again")
            polled = {n: v["value"] for n, v in zip(POLLED, got)}
            self._polled[k] = polled
            with self._lock:
                lost = self.counts.update(k, polled)
            if lost is not None:
                self.message(
                    f"worker {k} was restarted; the {lost} frame(s) its previous process held "
                    "are counted in Dropped",
                    severity=1,
                )

    def _stats_loop(self) -> None:
        while not self._stop.wait(self.cfg.edge.stats_publish_s):
            try:
                self._publish_stats()
                post = self.pvs["PhaseMap"].post
                self.stitcher.publish_map(post, time.monotonic(), self.cfg.edge.map_publish_s)
            except Exception:  # a statistics tick never stops the aggregate
                log.exception("aggregate: statistics not published")

    def _publish_stats(self) -> None:
        self._poll()
        now = time.monotonic()
        polled = list(self._polled.values())
        with self._lock:
            totals = self.counts.totals(self.duplicates)
        last, scan = self.stitcher.figures()
        values = dict(totals)
        values["MissedFrames"] = self.source.missed
        values["FrameRate"] = sum(1 for t in list(self._out_times) if now - t <= 2.0) / 2.0
        values["LatencyMs"] = max((float(p["LatencyMs"]) for p in polled), default=0.0)
        values["DroppedRate"] = sum(float(p["DroppedRate"]) for p in polled)
        versions = [int(p["ModelVersion"]) for p in polled if p["Mode"] == self.mode]
        if versions:
            values["ModelVersion"] = min(versions)
        if self.mode == "hedm":  # per-frame figures: the workers' means, by frames answered
            last, scan = self._hedm_consistency(polled)
        for name, value in values.items():
            self.pvs.scalars.post(name, value)
        if scan is not None:
            self.pvs.scalars.post("Consistency", last)
            self.pvs.scalars.post("ScanConsistency", scan)

    @staticmethod
    def _hedm_consistency(polled: list[dict]) -> tuple[float | None, float | None]:
        rows = [
            (float(p["Consistency"]), float(p["ScanConsistency"]), int(p["FramesOut"]))
            for p in polled
            if p["Mode"] == "hedm" and math.isfinite(float(p["ScanConsistency"]))
        ]
        weight = sum(n for *_, n in rows)
        if not rows or weight == 0:
            return None, None
        return rows[-1][0], sum(s * n for _, s, n in rows) / weight

    # ---- model loads ---------------------------------------------------------------------
    def load_version(self, version: int) -> str | None:
        """Every worker serves ``version``, or none does (edge_pva/worker_deploy.py): None
        once all serve it, else why not."""
        deploy = WorkerDeploy(
            self._ctx,
            self.workers,
            Registry(self.cfg.registry_path),
            self.message,
            self.cfg.edge.worker_load_timeout_s,
        )
        outcome = deploy.load(version)
        self._poll()
        return outcome

    def worker_exited(self, k: int, status: int | None) -> None:
        """The supervisor's report: worker ``k``'s process ended (it restarts it)."""
        self.message(
            f"worker {k} ({self.workers[k]}*) exited with status {status}; restarting it",
            severity=2,
        )

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> EdgeAggregate:
        self._server = self.pvs.server(f"{self.prefix}edge:")
        self._ctx = Context("pva", nt=False)
        for k, prefix in self.workers.items():
            for kind in ANSWERS:
                self._subscribe(prefix + kind, partial(self._on_answer, k, kind), ANSWER_REQUEST)
            self._subscribe(prefix + "Message", partial(self._on_message, k), "field()")
            # the deploy's channels held open from the start: a put that first searches
            # while one worker is stopped may not find the others (the workers share the
            # host's UDP search port; a unicast search is hashed to one of them)
            for field in ("LoadModel", "RevertModel"):
                self._subscribe(prefix + field, lambda value: None, "field(value)")
        self._subscribe(self.input_pv, self._on_source, WITNESS_REQUEST)
        loader = partial(self.loads.serve, self.load_version, self._stop)
        for name, target in (("stats", self._stats_loop), ("loader", loader)):
            thread = threading.Thread(target=target, name=f"aggregate_{name}_loop")
            thread.start()
            self._threads.append(thread)
        self.message(
            f"{self.n} workers ({self.prefix}edge:w1..w{self.n}); input {self.input_pv}, "
            f"shared by its '{self.plugin}' plugin (group {group_name(self.prefix)})"
        )
        return self

    def stop(self) -> None:
        self._stop.set()
        for sub in self._subs:
            sub.close()
        for thread in self._threads:
            thread.join(10)
        if self._ctx is not None:
            self._ctx.close()
        if self._server is not None:
            self._server.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
