"""The edge pvAccess server: monitor frames, infer in batches, publish results as PVs.

Each frame is handled in the mode its ``Mode`` NDAttribute names (``ptycho`` or ``hedm``), or
in the configured mode when it has none, by that mode's handler (edge_pva/modes.py); each
mode has its own model kind and model slot (edge_pva/model_loader.py).

PVs (prefix P, edge_pva/edge_pvs.py): edge:Phase, edge:Amplitude (ptycho: NTNDArray per
input frame, same uniqueId), edge:PhaseMap (stitched), edge:Peaks (hedm: NTTable per input
frame), edge:PeakCount, edge:FramesIn, :FramesOut, :Dropped, :BadFrames, :InFlight,
:FrameRate, :LatencyMs, :Restarts, :Mode (of the last frame), :ModelVersion (serving that
mode), :Message, and edge:LoadModel (write a registry version number of either kind; the put
completes once the model serves, or fails with the reason it was rejected).

Whatever a frame holds, it is answered or refused (counted in BadFrames, summarised in
Message once per ``edge.bad_frame_report_s``), and every count is taken from one snapshot:
FramesIn = FramesOut + Dropped + BadFrames + InFlight.  Worker threads are supervised: one
that dies is reported (Message MAJOR, Restarts) and restarted; one that keeps dying stops the
edge with a non-zero exit, so a process supervisor restarts it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np
import torch
from p4p.client.thread import Context, Disconnected
from p4p.nt import NTScalar
from p4p.server.thread import SharedPV

from edgeloop import ntnd
from edgeloop.config import MODE_KIND, MODES, Config
from edgeloop.edge_pva.access import LoadModelPut
from edgeloop.edge_pva.edge_pvs import EdgePvs, LoadRequests
from edgeloop.edge_pva.edge_stats import EdgeStatistics, InputWatch
from edgeloop.edge_pva.frame_queue import FrameQueue
from edgeloop.edge_pva.inference import ModelRejected, ModelSlot
from edgeloop.edge_pva.model_loader import ModelLoader
from edgeloop.edge_pva.modes import HANDLERS
from edgeloop.edge_pva.stitch import Stitcher
from edgeloop.edge_pva.supervise import Supervisor
from edgeloop.frame_ids import Arrival, FrameIds
from edgeloop.registry import Registry

log = logging.getLogger(__name__)

# Every server kind delivers each frame once to this request; pipeline=true does not: a
# pvDatabase server (pvapy, areaDetector's NDPluginPva) then resends frames many times.
MONITOR_REQUEST = "field()record[queueSize=32]"


class EdgeServer:
    def __init__(
        self,
        cfg: Config,
        input_pv: str | None = None,
        *,
        pv_prefix: str | None = None,
        monitor_request=None,
        extra_pvs: dict | None = None,
        server_args: dict | None = None,
        client_args: dict | None = None,
        worker: bool = False,
    ):
        """``pv_prefix``: of the served PVs (default ``{prefix}edge:``); ``monitor_request``:
        of the input (str or p4p Value; default MONITOR_REQUEST); ``extra_pvs``: more
        SharedPVs served under ``pv_prefix`` (an edge worker's, edge_pva/workers.py);
        ``server_args``, ``client_args``: for p4p's ``Server`` and the input's ``Context``
        (a test's ``{"isolate": True}`` and ``{"conf": source.conf(), "useenv": False}``);
        ``worker``: one of the workers of an aggregate (edge_pva/aggregate.py)."""
        self.cfg = cfg
        self.prefix = cfg.prefix
        self.input_pv = input_pv or f"{cfg.prefix}det:Pva1:Image"
        self.pv_prefix = pv_prefix or f"{cfg.prefix}edge:"
        self.monitor_request = MONITOR_REQUEST if monitor_request is None else monitor_request
        self.extra_pvs = dict(extra_pvs or {})
        self.server_args, self.client_args = dict(server_args or {}), dict(client_args or {})
        self.registry = Registry(cfg.registry_path)
        torch.set_num_threads(cfg.edge.threads)
        self.queue = FrameQueue(cfg.edge.queue_size, cfg.edge.max_queue_bytes)
        self.frame_ids = FrameIds()
        self.mode = cfg.mode  # of the last frame handled
        self.loads = LoadRequests()
        self.pvs = EdgePvs(cfg, self.mode, self.loads)
        # a worker's aggregate records what is accepted, and withdraws a version not every
        # worker loaded through its RevertModel (answered in order with LoadModel)
        self.models = ModelLoader(
            cfg, self.registry, self.pvs.message, self._swapped, records=not worker
        )
        if worker:
            revert = LoadModelPut(self.loads.queue, cfg.security, action="revert")
            self.extra_pvs["RevertModel"] = SharedPV(nt=NTScalar("l"), initial=0, handler=revert)
        self.pvs["ModelVersion"].post(self.slot.get().version)
        self.stitcher = Stitcher(cfg)
        self.handlers = {mode: handler(self) for mode, handler in HANDLERS.items()}
        self.stats = EdgeStatistics(self)
        self.input = InputWatch(self)
        self._stop = threading.Event()
        self.supervisor = Supervisor(self._stop, self._thread_died, self._fatal)
        # ptycho answers on their way to the publishing thread, a batch each: the model's
        # thread goes on with the next batch while the last one is stitched and published
        self._answers: queue.Queue = queue.Queue(maxsize=4)
        self._server = None
        self._ctx = None
        self._sub = None
        self._failed = threading.Event()  # a worker kept dying

    # ---- model ---------------------------------------------------------------------------
    @property
    def slots(self) -> dict[str, ModelSlot]:
        return self.models.slots

    @property
    def slot(self) -> ModelSlot:
        """The model slot of the current mode."""
        return self.models.slots[MODE_KIND[self.mode]]

    def load_version(self, version: int) -> None:
        """Load, validate and swap in a registry version; raises with the reason if rejected."""
        self.models.load_version(version)

    def _load(self, version: int) -> str | None:
        """An edge:LoadModel put: None once ``version`` serves, else the reason it does not."""
        try:
            self.load_version(version)
        except ModelRejected as exc:
            return str(exc)
        return None

    def _swapped(self, kind: str, version: int) -> None:
        if MODE_KIND[self.mode] == kind:
            self.pvs["ModelVersion"].post(version)

    # ---- frame path ----------------------------------------------------------------------
    @property
    def frames_out(self) -> int:
        return self.queue.answered

    @property
    def input_connected(self) -> bool:
        """Whether the input PV has answered since the last disconnection."""
        return self.input.connected

    @property
    def latencies(self):
        """Arrival-to-answer latencies (ms), newest last."""
        return self.stats.latencies

    def count_out(self, frame, now: float) -> None:
        self.stats.count_out(frame, now)

    def _on_frame(self, value) -> None:
        if isinstance(value, Exception):
            if isinstance(value, Disconnected):
                self.input.disconnected()
            else:
                log.warning("input %s: %s", self.input_pv, value)
            return
        if not self.input.connected:
            self.input.back()
        if self.supervisor.failed:
            return  # the edge is stopping: nothing more is taken in
        try:
            uid = int(value["uniqueId"])
            ts = value["timeStamp"]
            stamp = (int(ts["secondsPastEpoch"]), int(ts["nanoseconds"]))
            size = ntnd.payload_bytes(value)
        except Exception as exc:
            self.queue.refuse("?", f"not an NTNDArray: {type(exc).__name__}: {exc}")
            return
        if uid == 0:
            return  # the placeholder a detector PV holds before its first frame
        arrival = self.frame_ids.arrival(uid, stamp)
        if arrival is Arrival.REPEAT:
            return
        if size > self.cfg.edge.max_frame_bytes:
            self.queue.refuse(
                uid, f"{size} bytes, above edge.max_frame_bytes {self.cfg.edge.max_frame_bytes}"
            )
            return
        # arrival on the monotonic clock: latencies stay right when the host's clock steps
        self.queue.put((value, time.monotonic(), arrival is Arrival.RESTART), size)

    def _decode(self, item) -> ntnd.Frame | None:
        value, received, restart = item
        uid = value.get("uniqueId", "?")
        try:
            frame = ntnd.decode(value, received, self.cfg.edge.max_frame_bytes)
            mode = frame.attributes.get("Mode", self.cfg.mode)
            if not isinstance(mode, str) or mode not in MODES:
                raise ntnd.FrameError(f"Mode attribute {mode!r} is not one of {list(MODES)}")
            data = frame.data
            if data.dtype.kind == "f" and not np.isfinite(data).all():
                raise ntnd.FrameError(f"{data.size - np.isfinite(data).sum()} NaN/Inf pixels")
            self.handlers[mode].check(data)
        except Exception as exc:  # FrameError, or anything a damaged value raises
            reason = str(exc) if isinstance(exc, ntnd.FrameError) else f"{exc!r}"
            self.queue.settle_bad(uid, reason)
            return None
        frame.attributes["Mode"] = mode
        frame.new_acquisition = restart
        return frame

    def _set_mode(self, mode: str) -> None:
        if mode != self.mode:
            self._drain_answers()  # the last mode's answers count in its own figures
            self.mode = mode
            log.info("frames now in mode %s", mode)
            self.stitcher.reset_figures(lambda: self.pvs.scalars.set_mode(mode))
            self.pvs["Mode"].post(mode)
            self.pvs["ModelVersion"].post(self.slot.get().version)

    def _infer_loop(self) -> None:
        while not self._stop.is_set():
            items = self.queue.get_batch(self.cfg.edge.max_batch, timeout=0.1)
            frames = [f for f in map(self._decode, items) if f is not None]
            try:
                self._handle(list(frames))
            except Exception:
                for frame in frames:  # a bug: count what it left unanswered, then die
                    if not (frame.settled or frame.handed_over):
                        self.queue.settle_bad(frame.unique_id, "edge thread failed", 2)
                raise

    def _handle(self, frames: list) -> None:
        """Answer decoded frames; consecutive frames of one mode form a batch."""
        while frames:
            mode = frames[0].attributes["Mode"]
            n = next(
                (i for i, f in enumerate(frames) if f.attributes["Mode"] != mode), len(frames)
            )
            batch, frames = frames[:n], frames[n:]
            self._set_mode(mode)
            self.handlers[mode].handle(batch, self.slot.get())  # one model for the batch

    def guarded(self, frame, handle, *args) -> None:
        """Handle one frame; whatever fails, it is counted once, as bad, and reported."""
        try:
            handle(frame, *args)
        except Exception as exc:
            log.debug("frame uniqueId=%s failed", frame.unique_id, exc_info=True)
            if not frame.settled:
                frame.settled = True
                reason = f"inference failed: {type(exc).__name__}: {exc}"
                self.queue.settle_bad(frame.unique_id, reason, severity=2)

    def hand_over(self, answers: tuple) -> None:
        """To the publishing thread; waits while it is a few batches behind."""
        for frame in answers[0]:
            frame.handed_over = True
        while not self._stop.is_set():
            try:
                self._answers.put(answers, timeout=0.1)
                return
            except queue.Full:
                continue

    def _publish_loop(self) -> None:
        publish = self.handlers["ptycho"].publish
        while not self._stop.is_set():
            try:
                frames, amplitude, phase, version = self._answers.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                publish(frames, amplitude, phase, version)
            finally:
                self._answers.task_done()

    def _drain_answers(self) -> None:
        while self._answers.unfinished_tasks and not self._stop.is_set():
            time.sleep(0.001)

    # ---- supervision ---------------------------------------------------------------------
    def _thread_died(self, name: str, exc: BaseException) -> None:
        msg = f"edge thread {name} died ({type(exc).__name__}: {exc}); restarting it"
        self.pvs.message(msg, 2, logged=False)
        self.pvs.scalars.post("Restarts", self.supervisor.deaths)

    def _fatal(self, reason: str) -> None:
        msg = f"{reason}; the edge stops (exit status 1) for its supervisor to restart it"
        log.critical(msg)
        self.pvs.message(msg, 2, logged=False)
        self._failed.set()

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> EdgeServer:
        self._server = self.pvs.server(self.pv_prefix, self.extra_pvs, **self.server_args)
        for target in (self._infer_loop, self._publish_loop):
            self.supervisor.start(target)
        self.supervisor.start(self.stats.run, "stats_loop")
        self.supervisor.start(
            lambda: self.loads.serve(self._load, self._stop, self.models.revert), "loader_loop"
        )
        self._ctx = Context("pva", nt=False, **self.client_args)
        self._sub = self._ctx.monitor(
            self.input_pv, self._on_frame, request=self.monitor_request, notify_disconnect=True
        )
        self.pvs.message(
            f"serving model v{self.slot.get().version}; input {self.input_pv}", logged=False
        )
        log.info(
            "edge server %s* up; input %s; model v%d",
            self.pv_prefix,
            self.input_pv,
            self.slot.get().version,
        )
        return self

    @property
    def server_conf(self) -> dict:
        """The running server's settings, for a client (``Context(conf=..., useenv=False)``)."""
        return self._server.conf()

    def stop(self) -> None:
        if self._sub is not None:
            self._sub.close()
        self._stop.set()
        self.supervisor.join(timeout=5)
        if self._ctx is not None:
            self._ctx.close()
        if self._server is not None:
            self._server.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def serve_forever(self) -> None:
        """Serve until interrupted; SystemExit(1) when a worker thread keeps dying."""
        self.start()
        try:
            while not self._failed.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
        if self.supervisor.failed:
            raise SystemExit(f"edge stopped: {self.supervisor.failed}")
