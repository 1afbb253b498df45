"""The edge pvAccess server: monitor frames, infer in batches, publish results as PVs.

PVs (prefix P): edge:Phase, edge:Amplitude (NTNDArray per input frame, same uniqueId),
edge:PhaseMap (stitched), edge:FramesIn, :FramesOut, :Dropped, :BadFrames, :FrameRate,
:LatencyMs, :ModelVersion, :Message, and edge:LoadModel (write a registry version number;
the put completes once the model serves, or fails with the reason it was rejected).
"""

from __future__ import annotations

import collections
import logging
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
from edgeloop.config import Config
from edgeloop.models import kind as model_kind
from edgeloop.registry import ModelFileError, Registry
from edgeloop.edge_pva.frame_queue import FrameQueue
from edgeloop.edge_pva.inference import (ModelRejected, ModelSlot, ServedModel, make_backend,
                                         validate)
from edgeloop.edge_pva.stitch import PhaseMap

log = logging.getLogger(__name__)

PIPELINE_REQUEST = "field()record[pipeline=true,queueSize=32]"


class _LoadModelHandler:
    def __init__(self, requests: queue.Queue):
        self.requests = requests

    def put(self, pv, op):
        try:
            version = int(op.value())
        except (TypeError, ValueError):
            op.done(error="write a model version number (integer >= 1)")
            return
        if version < 1:
            op.done(error=f"model version must be >= 1, got {version}")
            return
        self.requests.put((version, op))


class EdgeServer:
    def __init__(self, cfg: Config, input_pv: str | None = None):
        self.cfg = cfg
        self.prefix = cfg.prefix
        self.input_pv = input_pv or f"{cfg.prefix}det:Pva1:Image"
        self.registry = Registry(cfg.registry_path)
        self.spec = model_kind(cfg.model.kind)
        torch.set_num_threads(cfg.edge.threads)
        self.queue = FrameQueue(cfg.edge.queue_size)
        self._recent_frames: collections.deque = collections.deque(maxlen=4)  # probe batches
        self.slot = ModelSlot(self._initial_model())
        self.phase_map = PhaseMap(cfg.edge.map_size, cfg.model.input_size, cfg.sim.pixel_um,
                                  cfg.edge.stitch_sigma_px)
        self._map_lock = threading.Lock()
        self._map_dirty = False
        self._last_uid = None
        self._latencies: collections.deque = collections.deque(maxlen=2000)
        self._out_times: collections.deque = collections.deque(maxlen=2000)
        self.frames_out = self.bad_frames = 0
        self._stop = threading.Event()
        self._load_requests: queue.Queue = queue.Queue()
        self._pvs = self._make_pvs()
        self._threads: list[threading.Thread] = []
        self._server = None
        self._ctx = None
        self._sub = None

    # ---- model ---------------------------------------------------------------------------
    def _serve(self, version: int, model) -> ServedModel:
        return ServedModel(version, self.spec, self.cfg.model.input_size,
                           make_backend(self.cfg.edge.backend, model))

    def _initial_model(self) -> ServedModel:
        version = self.registry.accepted()
        if version is not None:
            try:
                model, _ = self.registry.load(version)
                served = self._serve(version, model)
                validate(served, self._probe_frames())
                log.info("serving model v%d from %s", version, self.registry.root)
                return served
            except (ModelFileError, ModelRejected) as exc:
                log.error("accepted model v%d unusable (%s); serving an untrained model",
                          version, exc)
        torch.manual_seed(0)
        model = self.spec.build(width=self.cfg.model.width)
        log.info("no accepted model in %s: serving an untrained (random) model v0",
                 self.registry.root)
        return self._serve(0, model)

    def _probe_frames(self) -> list[np.ndarray]:
        frames = list(self._recent_frames)
        if not frames:
            rng = np.random.default_rng(0)
            n = self.cfg.model.input_size
            frames = [rng.poisson(50.0, (n, n)).astype(np.float32) for _ in range(2)]
        return frames

    def load_version(self, version: int) -> None:
        """Load, validate and swap in a registry version; raises with the reason if rejected."""
        try:
            model, meta = self.registry.load(version)
            if meta.get("kind") != self.spec.name:
                raise ModelRejected(f"model kind {meta.get('kind')!r} != {self.spec.name!r}")
            served = self._serve(version, model)
            validate(served, self._probe_frames())
        except (ModelFileError, ModelRejected) as exc:
            msg = f"model v{version} rejected: {exc}; still serving v{self.slot.get().version}"
            log.error(msg)
            try:
                self.registry.mark_rejected(version, str(exc))
            except ModelFileError:
                pass
            self._pvs["Message"].post(msg[:500], severity=2)
            raise ModelRejected(msg) from exc
        old = self.slot.swap(served)
        self.registry.mark_accepted(version)
        msg = f"model v{version} serving (was v{old.version})"
        log.info(msg)
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
        image = lambda size: SharedPV(initial=ntnd.build(np.zeros((size, size), np.float32), 0))
        pvs = {
            "Phase": image(n), "Amplitude": image(n), "PhaseMap": image(m),
            "Message": SharedPV(nt=NTScalar("s"), initial="starting"),
            "LoadModel": SharedPV(nt=NTScalar("l"), initial=0,
                                  handler=_LoadModelHandler(self._load_requests)),
        }
        for name in ("FramesIn", "FramesOut", "Dropped", "BadFrames", "ModelVersion"):
            pvs[name] = SharedPV(nt=NTScalar("l"), initial=0)
        for name in ("FrameRate", "LatencyMs"):
            pvs[name] = SharedPV(nt=NTScalar("d", display=True), initial=0.0)
        pvs["ModelVersion"].post(self.slot.get().version)
        return pvs

    # ---- frame path ----------------------------------------------------------------------
    def _on_frame(self, value) -> None:
        if isinstance(value, Exception):
            if isinstance(value, Disconnected):
                log.warning("input %s disconnected", self.input_pv)
                self._pvs["Message"].post(f"input {self.input_pv} disconnected", severity=1)
            else:
                log.warning("input %s: %s", self.input_pv, value)
            return
        if value.get("uniqueId", 0) == 0:
            return  # the placeholder a detector PV holds before its first frame
        self.queue.put((value, time.time()))

    def _decode(self, item) -> ntnd.Frame | None:
        value, received = item
        try:
            return ntnd.decode(value, received)
        except ntnd.FrameError as exc:
            self.bad_frames += 1
            msg = f"bad frame uniqueId={value.get('uniqueId', '?')}: {exc}"
            log.warning(msg)
            self._pvs["Message"].post(msg[:500], severity=1)
            return None

    def _infer_loop(self) -> None:
        while not self._stop.is_set():
            items = self.queue.get_batch(self.cfg.edge.max_batch, timeout=0.1)
            if not items:
                continue
            frames = [f for f in map(self._decode, items) if f is not None]
            if not frames:
                continue
            served = self.slot.get()  # one model for the whole batch
            try:
                amplitude, phase = served.infer([f.data for f in frames])
            except Exception as exc:
                self.bad_frames += len(frames)
                log.exception("inference failed on %d frames", len(frames))
                self._pvs["Message"].post(f"inference failed: {exc}"[:500], severity=2)
                continue
            self._publish(frames, amplitude[:, 0], phase[:, 0], served.version)

    def _publish(self, frames, amplitude, phase, version: int) -> None:
        for frame, amp, ph in zip(frames, amplitude, phase):
            uid = frame.unique_id
            x, y = frame.attributes.get("SampleX"), frame.attributes.get("SampleY")
            with self._map_lock:
                if self._last_uid is not None and uid < self._last_uid:
                    self.phase_map.reset()  # uniqueId restarted: a new scan
                self._last_uid = uid
                if x is not None and y is not None:
                    self.phase_map.add(ph, float(x), float(y))
                    self._map_dirty = True
            now = time.time()
            latency = (now - frame.received) * 1e3
            attrs = {"ModelVersion": version, "LatencyMs": latency}
            if x is not None and y is not None:
                attrs.update(SampleX=float(x), SampleY=float(y))
            self._pvs["Phase"].post(ntnd.build(ph, uid, attrs, frame.timestamp))
            self._pvs["Amplitude"].post(ntnd.build(amp, uid, attrs, frame.timestamp))
            self.frames_out += 1
            self._latencies.append(latency)
            self._out_times.append(now)
        self._recent_frames.extend(f.data for f in frames[-2:])

    # ---- statistics ----------------------------------------------------------------------
    def _stats_loop(self) -> None:
        last_map = 0.0
        while not self._stop.wait(self.cfg.edge.stats_publish_s):
            now = time.time()
            recent = [t for t in list(self._out_times) if now - t <= 2.0]
            rate = len(recent) / 2.0
            lat = list(self._latencies)[-100:]
            self._pvs["FramesIn"].post(self.queue.received)
            self._pvs["FramesOut"].post(self.frames_out)
            self._pvs["Dropped"].post(self.queue.dropped)
            self._pvs["BadFrames"].post(self.bad_frames)
            self._pvs["FrameRate"].post(rate)
            self._pvs["LatencyMs"].post(float(np.median(lat)) if lat else 0.0)
            if self._map_dirty and now - last_map >= self.cfg.edge.map_publish_s:
                with self._map_lock:
                    self._map_dirty = False
                    image, count = self.phase_map.image(), self.phase_map.count
                last_map = now
                self._pvs["PhaseMap"].post(ntnd.build(image, count))

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> "EdgeServer":
        names = {f"{self.prefix}edge:{k}": pv for k, pv in self._pvs.items()}
        self._server = Server(providers=[names])
        for target in (self._infer_loop, self._stats_loop, self._loader_loop):
            t = threading.Thread(target=target, name=target.__name__, daemon=True)
            t.start()
            self._threads.append(t)
        self._ctx = Context("pva", nt=False)
        self._sub = self._ctx.monitor(self.input_pv, self._on_frame, request=PIPELINE_REQUEST,
                                      notify_disconnect=True)
        self._pvs["Message"].post(f"serving model v{self.slot.get().version}; "
                                  f"input {self.input_pv}")
        log.info("edge server %sedge:* up; input %s; model v%d", self.prefix, self.input_pv,
                 self.slot.get().version)
        return self

    def stop(self) -> None:
        if self._sub is not None:
            self._sub.close()
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        if self._ctx is not None:
            self._ctx.close()
        if self._server is not None:
            self._server.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def serve_forever(self) -> None:
        self.start()
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
