"""What the edge does with a frame of each mode, looked up in ``HANDLERS`` by the frame's
``Mode`` NDAttribute: ``PtychoFrames`` (PtychoNN on the batch, then, in the publishing
thread, edge:Phase/:Amplitude, the stitched map and the label-free figures) and
``HedmFrames`` (peak finder, BraggNN on each frame's patches, edge:Peaks).

A handler is built with the edge (``FramePath``, edge_pva/server.py) whose queue, PVs,
stitcher and models it uses; ``check(data)`` refuses a decoded frame the mode cannot take,
``handle(frames, served)`` answers a batch."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from edgeloop import ntnd
from edgeloop.edge_pva.inference import ModelRejected, ServedModel
from edgeloop.edge_pva.label_free import DataResidual, combine, edge_probe
from edgeloop.edge_pva.peak_tables import locate_peaks, peak_table
from edgeloop.edge_pva.stitch import finite_position

log = logging.getLogger(__name__)


class PtychoFrames:
    kind = "ptychonn"

    def __init__(self, edge):
        self.edge = edge
        sim = edge.cfg.sim  # the detector's optics: the probe predictions are checked with
        self.residual = DataResidual(
            edge_probe(
                edge.cfg.edge.probe_file, sim.frame_size, sim.probe_radius_px, sim.probe_defocus
            )
        )
        if self.residual.size != sim.frame_size:
            log.warning(
                "edge.probe_file's probe is %d px, frames %d px: frames of another size than the "
                "probe's get no data residual",
                self.residual.size,
                sim.frame_size,
            )

    def check(self, data: np.ndarray) -> None:
        """A frame smaller than the network's input is zero-padded: bound what that costs."""
        size = self.edge.cfg.model.input_size
        padded = max(data.shape[0], size) * max(data.shape[1], size) * 4
        if padded > self.edge.cfg.edge.max_frame_bytes:
            raise ntnd.FrameError(
                f"a {data.shape[1]}x{data.shape[0]} frame padded to the network's {size} px "
                f"needs {padded} bytes, above edge.max_frame_bytes"
            )

    def handle(self, frames: list, served: ServedModel) -> None:
        """The batch at once; if that fails, frame by frame, so only the culprit is lost."""
        try:
            amplitude, phase = served.infer([f.data for f in frames])
        except Exception:
            for frame in frames:
                self.edge.guarded(frame, self._one, served)
            return
        self.edge.hand_over((frames, amplitude, phase, served.version))
        self.edge.models.recent[self.kind].extend(f.data for f in frames[-2:])

    def _one(self, frame, served: ServedModel) -> None:
        amplitude, phase = served.infer([frame.data])
        self.edge.hand_over(([frame], amplitude, phase, served.version))

    def publish(self, frames: list, amplitude: np.ndarray, phase: np.ndarray, version: int):
        """A batch of answers (the publishing thread): each placed in the map, checked
        against the map and against its frame (the data residuals of a run of frames of
        one acquisition in one FFT call), posted and counted; a frame that fails is counted
        once, as bad."""
        placed: list[Placed] = []
        for frame, amp, ph in zip(frames, amplitude[:, 0], phase[:, 0]):
            if frame.new_acquisition and placed:  # the figures of the last one first
                self._post_all(placed, version)
                placed = []
            self.edge.guarded(frame, self._place, amp, ph, placed)
        self._post_all(placed, version)

    def _place(self, frame, amp, ph, placed: list) -> None:
        if not (np.isfinite(amp).all() and np.isfinite(ph).all()):
            raise ModelRejected("the model gave NaN/Inf for this frame")
        names = self.edge.cfg.positions.of("ptychography")
        xy = finite_position(frame.attributes, names)
        if xy is None and any(frame.attributes.get(k) is not None for k in names):
            x, y = names
            self.edge.stats.note(f"{x}/{y} not finite numbers: answered, not stitched")
        if frame.new_acquisition:
            self.edge.stitcher.new_acquisition()
        overlap, surround = self.edge.stitcher.place(ph, xy) if xy is not None else (None, None)
        placed.append(Placed(frame, amp, ph, xy, overlap, surround))

    def _post_all(self, placed: list, version: int) -> None:
        try:
            # label-free quality (edge_pva/label_free.py): does each answer explain its frame
            data = self.residual.batch([(p.frame.data, p.amp, p.ph, p.surround) for p in placed])
        except Exception:
            log.exception("data residual failed: answers posted without it")
            data = [None] * len(placed)
        for p, residual in zip(placed, data):
            self.edge.guarded(p.frame, self._post, p, residual, version)

    def _post(self, frame, p: Placed, data: float | None, version: int) -> None:
        edge = self.edge
        consistency = combine(p.overlap, data)
        edge.stitcher.add(consistency)
        now = time.monotonic()  # frame.received is on it (server._on_frame)
        attrs = {"ModelVersion": version, "LatencyMs": (now - frame.received) * 1e3}
        if p.xy is not None:
            attrs.update(SampleX=p.xy[0], SampleY=p.xy[1])
        figures = {"Consistency": consistency, "ConsistencyOverlap": p.overlap}
        attrs.update(
            {k: v for k, v in {**figures, "ConsistencyData": data}.items() if v is not None}
        )
        edge.pvs["Phase"].post(ntnd.build(p.ph, frame.unique_id, attrs, frame.timestamp))
        edge.pvs["Amplitude"].post(ntnd.build(p.amp, frame.unique_id, attrs, frame.timestamp))
        edge.count_out(frame, now)  # after the posts: FramesOut never runs ahead


@dataclass
class Placed:
    """An answer placed in the map, waiting for its data residual."""

    frame: object
    amp: np.ndarray
    ph: np.ndarray
    xy: tuple[float, float] | None
    overlap: float | None
    surround: np.ndarray | None


class HedmFrames:
    kind = "braggnn"

    def __init__(self, edge):
        self.edge = edge

    def check(self, data: np.ndarray) -> None:
        pass

    def handle(self, frames: list, served: ServedModel) -> None:
        for frame in frames:
            self.edge.guarded(frame, self._one, served)

    def _one(self, frame, served: ServedModel) -> None:
        """Peaks of a frame: finder -> patches -> all patches of the frame in one batch."""
        edge, cfg = self.edge, self.edge.cfg.edge
        peaks, patches, left_out = locate_peaks(
            frame.data,
            served.infer,
            served.input_size,
            sigma=cfg.peak_sigma,
            min_separation=cfg.peak_min_separation,
            max_peaks=cfg.max_peaks_per_frame,
        )
        if not all(np.isfinite(peaks[k]).all() for k in ("x", "y")):
            raise ModelRejected("the model gave non-finite peak centres")
        if frame.new_acquisition:
            edge.stitcher.reset_figures()
        offsets = peaks["offset"][np.isfinite(peaks["offset"])]
        if len(offsets):  # label-free quality: BraggNN's centres vs the patch centroids
            edge.stitcher.add(float(offsets.mean()))
        warning = ""
        if left_out:
            warning = f"{left_out} maxima above edge.max_peaks_per_frame left out"
            edge.stats.note(f"peaks left out (max_peaks_per_frame {cfg.max_peaks_per_frame})")
        edge.pvs["Peaks"].post(peak_table(frame.unique_id, peaks, frame.timestamp, warning))
        edge.pvs["PeakCount"].post(len(patches))
        edge.count_out(frame, time.monotonic())
        edge.models.recent[self.kind].extend(patches[:4])


HANDLERS = {"ptycho": PtychoFrames, "hedm": HedmFrames}
