"""The edge pvAccess server: monitor frames, infer in batches, publish results as PVs.

Each frame is handled in the mode its ``Mode`` NDAttribute names (``ptycho`` or ``hedm``), or
in the configured mode when it has none; each mode has its own model kind and model slot.

PVs (prefix P): edge:Phase, edge:Amplitude (ptycho: NTNDArray per input frame, same
uniqueId), edge:PhaseMap (stitched), edge:Peaks (hedm: NTTable per input frame),
edge:PeakCount, edge:FramesIn, :FramesOut, :Dropped, :BadFrames, :InFlight, :FrameRate,
:LatencyMs, :Restarts, :Mode (of the last frame), :ModelVersion (serving that mode),
:Message, and edge:LoadModel (write a registry version number of either kind; the put
completes once the model serves, or fails with the reason it was rejected).

Whatever a frame holds, it is answered or refused (counted in BadFrames, summarised in
Message once per ``edge.bad_frame_report_s``), and every count is taken from one snapshot:
FramesIn = FramesOut + Dropped + BadFrames + InFlight.  Worker threads are supervised: one
that dies is reported (Message MAJOR, Restarts) and restarted; one that keeps dying stops the
edge with a non-zero exit, so a process supervisor restarts it.
"""

from __future__ import annotations

import collections
import logging
import math
import numbers
import queue
import threading
import time

import numpy as np
import torch
from p4p.client.thread import Context, Disconnected
from p4p.nt import NTScalar
from p4p.server import Server
from p4p.server.thread import SharedPV

from edgeloop import ntnd
from edgeloop.config import MODE_KIND, MODES, Config, search_hint
from edgeloop.edge_pva.access import LoadModelPut
from edgeloop.edge_pva.frame_ids import Arrival, FrameIds
from edgeloop.edge_pva.frame_queue import FrameQueue
from edgeloop.edge_pva.hedm import NO_PEAKS, locate_peaks, peak_table
from edgeloop.edge_pva.inference import (
    ModelRejected,
    ModelSlot,
    ServedModel,
    check_backend,
    probe_inputs,
    served_model,
    untrained_model,
    validate,
)
from edgeloop.edge_pva.quality import DataResidual, combine, edge_probe
from edgeloop.edge_pva.scalars import ScalarPVs
from edgeloop.edge_pva.stitch import PhaseMap, ScanConsistency
from edgeloop.edge_pva.supervise import Supervisor
from edgeloop.registry import ModelFileError, ModelUnavailable, Registry

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
    ):
        """``pv_prefix``: of the served PVs (default ``{prefix}edge:``); ``monitor_request``:
        of the input (str or p4p Value; default MONITOR_REQUEST); ``extra_pvs``: more
        SharedPVs served under ``pv_prefix`` (an edge worker's, edge_pva/workers.py)."""
        self.cfg = cfg
        self.prefix = cfg.prefix
        self.input_pv = input_pv or f"{cfg.prefix}det:Pva1:Image"
        self.pv_prefix = pv_prefix or f"{cfg.prefix}edge:"
        self.monitor_request = MONITOR_REQUEST if monitor_request is None else monitor_request
        self.extra_pvs = dict(extra_pvs or {})
        self.registry = Registry(cfg.registry_path)
        torch.set_num_threads(cfg.edge.threads)
        self.queue = FrameQueue(cfg.edge.queue_size)
        self.frame_ids = FrameIds()
        # recent inputs of each kind: the probe batch a candidate model must pass
        self._recent = {k: collections.deque(maxlen=4) for k in MODE_KIND.values()}
        check_backend(cfg.edge.backend)  # one clear error before any model loads
        self.slots = {k: ModelSlot(self._initial_model(k)) for k in MODE_KIND.values()}
        self.mode = cfg.mode  # of the last frame handled
        self.phase_map = PhaseMap(
            cfg.edge.map_size, cfg.model.input_size, cfg.sim.pixel_um, cfg.edge.stitch_sigma_px
        )
        self._map_lock = threading.Lock()
        self._map_dirty = False
        self.consistency = ScanConsistency()  # of the current acquisition; under _map_lock
        sim = cfg.sim  # the detector's optics: the probe predictions are checked with
        self.residual = DataResidual(
            edge_probe(cfg.edge.probe_file, sim.frame_size, sim.probe_radius_px, sim.probe_defocus)
        )
        if self.residual.size != sim.frame_size:
            log.warning(
                "edge.probe_file's probe is %d px, frames %d px: frames of another size than the "
                "probe's get no data residual",
                self.residual.size,
                sim.frame_size,
            )
        self.latencies: collections.deque = collections.deque(maxlen=2000)  # ms, newest last
        self._out_times: collections.deque = collections.deque(maxlen=2000)
        # frames answered with a caveat (not stitched, peaks left out): reason -> count
        self._notes: collections.Counter = collections.Counter()
        self._last_report = time.monotonic()
        self._stop = threading.Event()
        self.supervisor = Supervisor(self._stop, self._thread_died, self._fatal)
        self._load_requests: queue.Queue = queue.Queue()
        # ptycho answers on their way to the publishing thread, a batch each: the model's
        # thread goes on with the next batch while the last one is stitched and published
        self._answers: queue.Queue = queue.Queue(maxsize=4)
        self._scalars = ScalarPVs(cfg.edge, self.mode)
        self._pvs = self._make_pvs()
        self._server = None
        self._ctx = None
        self._sub = None
        self._input_since: float | None = time.monotonic()  # not connected since
        self._input_seen = False  # a frame has arrived since start
        self._failed = threading.Event()  # a worker kept dying
        self._input_reported = False

    # ---- model ---------------------------------------------------------------------------
    @property
    def slot(self) -> ModelSlot:
        """The model slot of the current mode."""
        return self.slots[MODE_KIND[self.mode]]

    def _validate(self, served: ServedModel) -> None:
        kind = served.spec.name
        validate(served, probe_inputs(kind, served.input_size, list(self._recent[kind])))

    def _initial_model(self, kind: str) -> ServedModel:
        version = self.registry.accepted(kind)
        if version is not None:
            try:
                model, _ = self.registry.load(version, self.cfg.security)
                served = served_model(self.cfg, kind, version, model)
                self._validate(served)
                log.info("serving %s model v%d from %s", kind, version, self.registry.root)
                return served
            except (ModelFileError, ModelRejected) as exc:
                log.error(
                    "accepted %s model v%d unusable (%s); serving an untrained model",
                    kind,
                    version,
                    exc,
                )
        log.info(
            "no accepted %s model in %s: serving an untrained (random) model v0",
            kind,
            self.registry.root,
        )
        return untrained_model(self.cfg, kind)

    def load_version(self, version: int) -> None:
        """Load, validate and swap in a registry version; raises with the reason if rejected."""
        kind = None
        try:
            meta = self.registry.meta(version)
            if meta.get("status") == "rejected":
                raise ModelUnavailable(
                    f"it was rejected ({meta.get('status_reason') or 'no reason recorded'}); "
                    "a rejected version is never served"
                )
            model, meta = self.registry.load(version, self.cfg.security)
            kind = meta.get("kind")
            if kind not in self.slots:
                raise ModelRejected(
                    f"model kind {kind!r} is not served here ({sorted(self.slots)})"
                )
            served = served_model(self.cfg, kind, version, model)
            self._validate(served)
        except (ModelFileError, ModelRejected) as exc:
            serving = ", ".join(f"{k} v{s.get().version}" for k, s in self.slots.items())
            msg = f"model v{version} rejected: {exc}; still serving {serving}"
            log.error(msg)
            if not isinstance(exc, ModelUnavailable):  # a transient error rejects nothing
                try:
                    self.registry.mark_rejected(version, str(exc))
                except ModelFileError:
                    pass
            self._pvs["Message"].post(msg[:500], severity=2)
            raise ModelRejected(msg) from exc
        old = self.slots[kind].swap(served)
        self.registry.mark_accepted(version)
        msg = f"{kind} model v{version} serving (was v{old.version})"
        log.info(msg)
        if MODE_KIND[self.mode] == kind:
            self._pvs["ModelVersion"].post(version)
        self._pvs["Message"].post(msg, severity=0)

    def _loader_loop(self) -> None:
        while not self._stop.is_set():
            try:
                version, op = self._load_requests.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.load_version(version)
                op.done()
            except ModelRejected as exc:
                op.done(error=str(exc))
            except Exception as exc:  # never let the loader thread die
                log.exception("model load failed")
                op.done(error=f"model v{version} load failed: {exc}")

    # ---- PVs -----------------------------------------------------------------------------
    def _make_pvs(self) -> dict[str, SharedPV]:
        n = self.cfg.model.input_size
        m = self.cfg.edge.map_size

        def image(size):
            return SharedPV(initial=ntnd.build(np.zeros((size, size), np.float32), 0))

        pvs = {
            "Phase": image(n),
            "Amplitude": image(n),
            "PhaseMap": image(m),
            "Peaks": SharedPV(initial=peak_table(0, NO_PEAKS)),
            "Mode": SharedPV(nt=NTScalar("s"), initial=self.mode),
            "Message": SharedPV(nt=NTScalar("s"), initial="starting"),
            "LoadModel": SharedPV(
                nt=NTScalar("l"),
                initial=0,
                handler=LoadModelPut(self._load_requests, self.cfg.security),
            ),
        }
        pvs.update(self._scalars.pvs)
        pvs["ModelVersion"].post(self.slot.get().version)
        return pvs

    # ---- frame path ----------------------------------------------------------------------
    @property
    def frames_out(self) -> int:
        return self.queue.answered

    @property
    def input_connected(self) -> bool:
        """Whether the input PV has answered since the last disconnection."""
        return self._input_since is None

    def _on_frame(self, value) -> None:
        if isinstance(value, Exception):
            if isinstance(value, Disconnected):
                if self._input_since is None:
                    log.warning("input %s disconnected", self.input_pv)
                    self._pvs["Message"].post(f"input {self.input_pv} disconnected", severity=1)
                    self._input_since = time.monotonic()
            else:
                log.warning("input %s: %s", self.input_pv, value)
            return
        if self._input_since is not None:
            self._input_back()
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
        self.queue.put((value, time.time(), arrival is Arrival.RESTART))

    def _decode(self, item) -> ntnd.Frame | None:
        value, received, restart = item
        uid = value.get("uniqueId", "?")
        try:
            frame = ntnd.decode(value, received)
            mode = frame.attributes.get("Mode", self.cfg.mode)
            if not isinstance(mode, str) or mode not in MODES:
                raise ntnd.FrameError(f"Mode attribute {mode!r} is not one of {list(MODES)}")
            data = frame.data
            if data.dtype.kind == "f" and not np.isfinite(data).all():
                raise ntnd.FrameError(f"{data.size - np.isfinite(data).sum()} NaN/Inf pixels")
            if mode == "ptycho":
                self._check_ptycho_size(data.shape)
        except Exception as exc:  # FrameError, or anything a damaged value raises
            reason = str(exc) if isinstance(exc, ntnd.FrameError) else f"{exc!r}"
            self.queue.settle_bad(uid, reason)
            return None
        frame.attributes["Mode"] = mode
        frame.new_acquisition = restart
        return frame

    def _check_ptycho_size(self, shape) -> None:
        """A frame smaller than the network's input is zero-padded: bound what that costs."""
        size = self.cfg.model.input_size
        padded = max(shape[0], size) * max(shape[1], size) * 4
        if padded > self.cfg.edge.max_frame_bytes:
            raise ntnd.FrameError(
                f"a {shape[1]}x{shape[0]} frame padded to the network's {size} px needs "
                f"{padded} bytes, above edge.max_frame_bytes"
            )

    def _set_mode(self, mode: str) -> None:
        if mode != self.mode:
            self._drain_answers()  # the last mode's answers count in its own figures
            self.mode = mode
            log.info("frames now in mode %s", mode)
            with self._map_lock:  # the figure and its units are the mode's
                self.consistency.reset()
                self._scalars.set_mode(mode)
            self._pvs["Mode"].post(mode)
            self._pvs["ModelVersion"].post(self.slot.get().version)

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
            served = self.slot.get()  # one model for the whole batch
            if mode == "hedm":
                for frame in batch:
                    self._guarded(frame, self._hedm, served)
            else:
                self._ptycho(batch, served)

    def _guarded(self, frame, handle, *args) -> None:
        """Handle one frame; whatever fails, it is counted once, as bad, and reported."""
        try:
            handle(frame, *args)
        except Exception as exc:
            log.debug("frame uniqueId=%s failed", frame.unique_id, exc_info=True)
            if not frame.settled:
                frame.settled = True
                reason = f"inference failed: {type(exc).__name__}: {exc}"
                self.queue.settle_bad(frame.unique_id, reason, severity=2)

    def _ptycho(self, frames, served: ServedModel) -> None:
        """The batch at once; if that fails, frame by frame, so only the culprit is lost."""
        try:
            amplitude, phase = served.infer([f.data for f in frames])
        except Exception:
            for frame in frames:
                self._guarded(frame, self._ptycho_one, served)
            return
        self._hand_over((frames, amplitude, phase, served.version))
        self._recent["ptychonn"].extend(f.data for f in frames[-2:])

    def _ptycho_one(self, frame, served: ServedModel) -> None:
        amplitude, phase = served.infer([frame.data])
        self._hand_over(([frame], amplitude, phase, served.version))

    def _hand_over(self, answers: tuple) -> None:
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
        while not self._stop.is_set():
            try:
                frames, amplitude, phase, version = self._answers.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                for frame, amp, ph in zip(frames, amplitude[:, 0], phase[:, 0]):
                    self._guarded(frame, self._publish, amp, ph, version)
            finally:
                self._answers.task_done()

    def _drain_answers(self) -> None:
        while self._answers.unfinished_tasks and not self._stop.is_set():
            time.sleep(0.001)

    def _hedm(self, frame, served: ServedModel) -> None:
        """Peaks of a frame: finder -> patches -> all patches of the frame in one batch."""
        edge = self.cfg.edge
        peaks, patches, left_out = locate_peaks(
            frame.data,
            served.infer,
            served.input_size,
            sigma=edge.peak_sigma,
            min_separation=edge.peak_min_separation,
            max_peaks=edge.max_peaks_per_frame,
        )
        if not all(np.isfinite(peaks[k]).all() for k in ("x", "y")):
            raise ModelRejected("the model gave non-finite peak centres")
        warning = ""
        offsets = peaks["offset"][np.isfinite(peaks["offset"])]
        with self._map_lock:
            if frame.new_acquisition:
                self.consistency.reset()
            if len(offsets):  # label-free quality: BraggNN's centres vs the patch centroids
                self.consistency.add(float(offsets.mean()))
        if left_out:
            warning = f"{left_out} maxima above edge.max_peaks_per_frame left out"
            self._notes[f"peaks left out (max_peaks_per_frame {edge.max_peaks_per_frame})"] += 1
        self._pvs["Peaks"].post(peak_table(frame.unique_id, peaks, frame.timestamp, warning))
        self._pvs["PeakCount"].post(len(patches))
        self._count_out(frame, time.time())
        self._recent["braggnn"].extend(patches[:4])

    def _count_out(self, frame, now: float) -> None:
        """Count a frame answered at ``now`` and its latency since it arrived."""
        frame.settled = True
        self.queue.settle_answered()
        self.latencies.append((now - frame.received) * 1e3)
        self._out_times.append(now)

    def _position(self, frame) -> tuple[float, float] | None:
        """The frame's (SampleX, SampleY) if both are finite numbers, else None."""
        xy = frame.attributes.get("SampleX"), frame.attributes.get("SampleY")
        if all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            for v in xy
        ):
            return float(xy[0]), float(xy[1])
        if any(v is not None for v in xy):
            self._notes["SampleX/SampleY not finite numbers: answered, not stitched"] += 1
        return None

    def _publish(self, frame, amp, ph, version: int) -> None:
        if not (np.isfinite(amp).all() and np.isfinite(ph).all()):
            raise ModelRejected("the model gave NaN/Inf for this frame")
        uid = frame.unique_id
        xy = self._position(frame)
        overlap = surround = None
        with self._map_lock:
            if frame.new_acquisition:
                self.phase_map.reset()
                self.consistency.reset()
            if xy is not None:
                overlap = self.phase_map.disagreement(ph, *xy)
                surround = self.phase_map.surroundings(*xy)
                self.phase_map.add(ph, *xy)
                self._map_dirty = True
        # label-free quality (edge_pva/quality.py): does the answer agree with the map where
        # they overlap, and does it explain the frame it came from
        data = self.residual(frame.data, amp, ph, surround)
        consistency = combine(overlap, data)
        if consistency is not None:
            with self._map_lock:
                self.consistency.add(consistency)
        now = time.time()
        attrs = {"ModelVersion": version, "LatencyMs": (now - frame.received) * 1e3}
        if xy is not None:
            attrs.update(SampleX=xy[0], SampleY=xy[1])
        if consistency is not None:
            attrs["Consistency"] = consistency
        if overlap is not None:
            attrs["ConsistencyOverlap"] = overlap
        if data is not None:
            attrs["ConsistencyData"] = data
        self._pvs["Phase"].post(ntnd.build(ph, uid, attrs, frame.timestamp))
        self._pvs["Amplitude"].post(ntnd.build(amp, uid, attrs, frame.timestamp))
        self._count_out(frame, now)  # after the posts: FramesOut never runs ahead

    # ---- statistics ----------------------------------------------------------------------
    def _stats_loop(self) -> None:
        last_map = 0.0
        dropped: collections.deque = collections.deque()  # (time, count) over the last 2 s
        while not self._stop.wait(self.cfg.edge.stats_publish_s):
            now = time.time()
            recent = [t for t in list(self._out_times) if now - t <= 2.0]
            rate = len(recent) / 2.0
            lat = list(self.latencies)[-100:]
            dropped.append((now, self.queue.dropped))
            while now - dropped[0][0] > 2.0:
                dropped.popleft()
            counts = self.queue.counts()  # one snapshot: the counts add up
            values = {
                "FramesIn": counts["in"],
                "FramesOut": counts["out"],
                "Dropped": counts["dropped"],
                "BadFrames": counts["bad"],
                "InFlight": counts["in_flight"],
                "MissedFrames": self.frame_ids.missed,
                "Repeats": self.frame_ids.repeats,
                "FrameRate": rate,
                "LatencyMs": float(np.median(lat)) if lat else 0.0,
                "DroppedRate": (dropped[-1][1] - dropped[0][1]) / 2.0,
            }
            for name, value in values.items():
                self._scalars.post(name, value)
            with self._map_lock:  # a mode switch changes their units: not in between
                last, scan = self.consistency.last, self.consistency.mean
                if scan is not None:  # posted once a scan has a figure
                    self._scalars.post("Consistency", last)
                    self._scalars.post("ScanConsistency", scan)
            self._report_refusals()
            self._watch_input()
            if self._map_dirty and now - last_map >= self.cfg.edge.map_publish_s:
                with self._map_lock:
                    self._map_dirty = False
                    image, count = self.phase_map.image(), self.phase_map.count
                last_map = now
                self._pvs["PhaseMap"].post(ntnd.build(image, count))

    def _report_refusals(self) -> None:
        """One summary per ``edge.bad_frame_report_s`` of the frames refused or answered
        with a caveat since the last one, never a line per frame."""
        now = time.monotonic()
        span = now - self._last_report
        if span < self.cfg.edge.bad_frame_report_s:
            return
        refused = self.queue.take_reasons()
        notes, self._notes = self._notes, collections.Counter()
        if not refused and not notes:
            return
        self._last_report = now
        parts = [f"{n} x {reason} (e.g. uniqueId {uid})" for n, uid, reason, _ in refused]
        parts += [f"{n} x {note}" for note, n in notes.items()]
        total = sum(n for n, *_ in refused)
        what = f"{total} frame(s) refused" if total else "frames answered with a caveat"
        msg = f"{what} in the last {span:.1f} s: " + "; ".join(parts)
        log.warning(msg)
        severity = max([sev for *_, sev in refused] + [1])
        self._pvs["Message"].post(msg[:500], severity=severity)

    def _watch_input(self, grace_s: float = 5.0) -> None:
        """Say once which PV the edge cannot reach, and where it searched."""
        since = self._input_since
        if since is None:
            self._input_reported = False
        elif not self._input_reported and time.monotonic() - since > grace_s:
            self._input_reported = True
            msg = f"input {self.input_pv} not connected for {grace_s:.0f} s; {search_hint()}"
            log.warning(msg)
            self._pvs["Message"].post(msg, severity=1)

    def _input_back(self) -> None:
        """First frame after a disconnection: clear the alarm, say how long it was away."""
        away = time.monotonic() - self._input_since
        self._input_since = None
        if self._input_seen:
            msg = (
                f"input {self.input_pv} back after {away:.1f} s; frames it skipped are "
                f"counted in MissedFrames ({self.frame_ids.missed} so far)"
            )
            log.info(msg)
            self._pvs["Message"].post(msg, severity=0)
        self._input_seen = True

    # ---- supervision ---------------------------------------------------------------------
    def _thread_died(self, name: str, exc: BaseException) -> None:
        msg = f"edge thread {name} died ({type(exc).__name__}: {exc}); restarting it"
        self._pvs["Message"].post(msg[:500], severity=2)
        self._scalars.post("Restarts", self.supervisor.deaths)

    def _fatal(self, reason: str) -> None:
        msg = f"{reason}; the edge stops (exit status 1) for its supervisor to restart it"
        log.critical(msg)
        self._pvs["Message"].post(msg[:500], severity=2)
        self._failed.set()

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> EdgeServer:
        pvs = {**self._pvs, **self.extra_pvs}
        names = {f"{self.pv_prefix}{k}": pv for k, pv in pvs.items()}
        self._server = Server(providers=[names])
        for target in (self._infer_loop, self._publish_loop, self._stats_loop, self._loader_loop):
            self.supervisor.start(target)
        self._ctx = Context("pva", nt=False)
        self._sub = self._ctx.monitor(
            self.input_pv, self._on_frame, request=self.monitor_request, notify_disconnect=True
        )
        self._pvs["Message"].post(
            f"serving model v{self.slot.get().version}; input {self.input_pv}"
        )
        log.info(
            "edge server %s* up; input %s; model v%d",
            self.pv_prefix,
            self.input_pv,
            self.slot.get().version,
        )
        return self

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
