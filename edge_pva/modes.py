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

import numpy as np

from edgeloop import ntnd
from edgeloop.edge_pva.hedm import locate_peaks, peak_table
from edgeloop.edge_pva.inference import ModelRejected, ServedModel
from edgeloop.edge_pva.quality import DataResidual, combine, edge_probe
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

    def publish(self, frame, amp, ph, version: int) -> None:
        """One answer: stitched, checked against the map and the frame, posted, counted."""
        if not (np.isfinite(amp).all() and np.isfinite(ph).all()):
            raise ModelRejected("the model gave NaN/Inf for this frame")
        edge, stitcher = self.edge, self.edge.stitcher
        xy = finite_position(frame.attributes)
        if xy is None and any(frame.attributes.get(k) is not None for k in ("SampleX", "SampleY")):
            edge.notes["SampleX/SampleY not finite numbers: answered, not stitched"] += 1
        if frame.new_acquisition:
            stitcher.new_acquisition()
        overlap, surround = stitcher.place(ph, xy) if xy is not None else (None, None)
        # label-free quality (edge_pva/quality.py): does the answer agree with the map where
        # they overlap, and does it explain the frame it came from
        data = self.residual(frame.data, amp, ph, surround)
        consistency = combine(overlap, data)
        stitcher.add(consistency)
        now = time.time()
        attrs = {"ModelVersion": version, "LatencyMs": (now - frame.received) * 1e3}
        if xy is not None:
            attrs.update(SampleX=xy[0], SampleY=xy[1])
        figures = {"Consistency": consistency, "ConsistencyOverlap": overlap}
        attrs.update(
            {k: v for k, v in {**figures, "ConsistencyData": data}.items() if v is not None}
        )
        edge.pvs["Phase"].post(ntnd.build(ph, frame.unique_id, attrs, frame.timestamp))
        edge.pvs["Amplitude"].post(ntnd.build(amp, frame.unique_id, attrs, frame.timestamp))
        edge.count_out(frame, now)  # after the posts: FramesOut never runs ahead


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
            edge.notes[f"peaks left out (max_peaks_per_frame {cfg.max_peaks_per_frame})"] += 1
        edge.pvs["Peaks"].post(peak_table(frame.unique_id, peaks, frame.timestamp, warning))
        edge.pvs["PeakCount"].post(len(patches))
        edge.count_out(frame, time.time())
        edge.models.recent[self.kind].extend(patches[:4])


HANDLERS = {"ptycho": PtychoFrames, "hedm": HedmFrames}
