"""The service's live reference: it watches the detector's own stream, keeps a few percent of
each acquisition (windows of consecutive scan points), runs the conventional analysis on them in
a background thread (remote/reference.py) and publishes the serving model's error against it
as ``$(P)ml:ReferenceError``, what was measured in ``$(P)ml:ReferenceInfo``.

A window that arrives while the last is still being analysed is skipped (counted in the
info); the stream costs one decode per frame (its Mode attribute picks the plan). A monitor
squashes updates when its client falls behind: a window that lost a few frames is still
analysed (each frame carries its position); one left with fewer than three quarters of its
frames, by a short acquisition or a squashed monitor, is not (counted as incomplete).
Frames are decoded under the edge's limits (``edge.max_frame_bytes``, bounded codecs); one
that is refused is counted and logged at the 1st, 2nd, 4th, ... refusal (the edge reports
each)."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time

from edgeloop import ntnd
from edgeloop.config import MODE_KIND, Config
from edgeloop.frame_ids import Arrival, FrameIds
from edgeloop.registry import Registry

log = logging.getLogger(__name__)

UNITS = {"ptycho": "rad", "hedm": "px"}
# deep enough that a scan's window is not squashed while the service is busy
MONITOR_REQUEST = "field()record[queueSize=64]"
FAILED = "reference failed"  # how ml:ReferenceInfo begins when an analysis raised


class ReferenceMonitor:
    def __init__(
        self, cfg: Config, ctx, registry: Registry, put, input_pv: str | None = None,
        on_measured=lambda version, error, info: None,
    ):  # fmt: skip
        self.cfg, self.ctx, self.registry, self._put = cfg, ctx, registry, put
        self.on_measured = on_measured  # (model version, error, what was measured)
        self.input_pv = input_pv or f"{cfg.prefix}det:Pva1:Image"
        self._ids = FrameIds()  # the uniqueId rules the edge applies
        self._first_uid: int | None = None
        self._window: list = []  # (mode, frame) of the window being gathered
        self._window_key: tuple | None = None  # (acquisition's first uid, mode, window start)
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._models: dict = {}  # kind -> (version, model)
        self.done = self.skipped = self.failed = self.incomplete = self.refused = 0
        self._sub = None

    def start(self) -> ReferenceMonitor:
        threading.Thread(target=self._work, name="reference", daemon=True).start()
        self._sub = self.ctx.monitor(
            self.input_pv, self._on_frame, request=MONITOR_REQUEST, notify_disconnect=True
        )
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._sub is not None:
            self._sub.close()

    # ---- sampling (the monitor's thread: cheap unless the frame is in a window) ----------
    def _plan(self, mode: str) -> tuple[int, int]:
        r = self.cfg.remote
        if mode == "hedm":
            return r.reference_hedm_frames, r.reference_hedm_every
        return r.reference_window, r.reference_every

    def _on_frame(self, value) -> None:
        if isinstance(value, Exception):
            self._window, self._window_key = [], None
            return
        try:
            uid = int(value["uniqueId"])
            ts = value["timeStamp"]
            stamp = (int(ts["secondsPastEpoch"]), int(ts["nanoseconds"]))
        except Exception:
            return
        if uid == 0:
            return  # the placeholder a detector PV holds before its first frame
        arrival = self._ids.arrival(uid, stamp)
        if arrival in (Arrival.REPEAT, Arrival.LATE):
            return  # seen already, or behind the window being gathered
        if arrival is Arrival.RESTART or self._first_uid is None:  # a new acquisition
            self._flush()
            self._first_uid = uid
        try:
            frame = ntnd.decode(value, max_bytes=self.cfg.edge.max_frame_bytes)
        except (
            ntnd.FrameError
        ) as exc:  # the edge counts and reports each; logged here 1, 2, 4.. times
            self.refused += 1
            if self.refused & (self.refused - 1) == 0:
                log.warning("reference: frame %d refused (%s); %d refused", uid, exc, self.refused)
            return
        mode = str(frame.attributes.get("Mode", self.cfg.mode))
        if mode not in UNITS:
            return
        size, every = self._plan(mode)
        offset = uid - self._first_uid
        key = (self._first_uid, mode, offset - offset % every)
        in_window = offset % every < size
        if not in_window or key != self._window_key:
            self._flush()  # the window's range has passed, or a new one begins
        if not in_window:
            return
        self._window_key = key
        self._window.append((mode, frame))
        if offset % every == size - 1:  # the window's last frame
            self._flush()

    def _flush(self) -> None:
        """Queue the window gathered so far, if it kept at least three quarters of its frames."""
        window, self._window, self._window_key = self._window, [], None
        if not window:
            return
        size, _ = self._plan(window[0][0])
        if 4 * len(window) < 3 * size:
            self.incomplete += 1
            first, last = window[0][1].unique_id, window[-1][1].unique_id
            log.info(
                "reference window uniqueId %d-%d: %d of %d frames (the acquisition ended, or the"
                " monitor lost frames): not analysed",
                first,
                last,
                len(window),
                size,
            )
            return
        try:
            self._jobs.put_nowait(window)
        except queue.Full:
            self.skipped += 1

    # ---- analysis (its own thread) -------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                window = self._jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._analyse(window)
            except Exception as exc:  # never stop the service; say why in the info
                self.failed += 1
                log.exception("reference analysis failed")
                why = f"{FAILED}: {type(exc).__name__}: {exc}"
                self._put("ml:ReferenceInfo", why[:250])

    def _model(self, kind: str):
        version = self.registry.accepted(kind)
        if version is None:
            return None, None
        cached = self._models.get(kind)
        if cached is None or cached[0] != version:
            model, _ = self.registry.load(version, self.cfg.security)
            self._models[kind] = cached = (version, model.eval())
        return cached

    def _analyse(self, window: list) -> None:
        import numpy as np

        from edgeloop.remote.reference import hedm_reference, ptycho_reference

        mode = window[0][0]
        frames = [f for _, f in window]
        version, model = self._model(MODE_KIND[mode])
        if model is None:
            return  # nothing trained yet: the untrained model's error is not worth a reference
        t0 = time.perf_counter()
        data = np.stack([f.data for f in frames]).astype(np.float32)
        if mode == "hedm":
            result = hedm_reference(data, model, self.cfg)
        else:
            names = self.cfg.positions.of("ptychography")
            pos = np.array(
                [[f.attributes.get(n, np.nan) for n in names] for f in frames], np.float64
            )
            if not np.isfinite(pos).all():
                return  # frames without positions cannot be phase-retrieved together
            result = ptycho_reference(data, pos, model, self.cfg)
        error = result["reference_error"]
        if error is None or not math.isfinite(error):
            return
        self.done += 1
        info = (
            f"{mode}: {error:.4g} {UNITS[mode]} on {len(frames)} frames (uniqueId "
            f"{frames[0].unique_id}-{frames[-1].unique_id}), model v{version}, "
            f"{time.perf_counter() - t0:.1f} s; {self.done} done, {self.skipped} skipped, "
            f"{self.incomplete} incomplete"
        )
        log.info("reference: %s", info)
        self._put("ml:ReferenceError", float(error))
        self._put("ml:ReferenceInfo", info[:250])
        self.on_measured(version, float(error), info)
