"""What a scientist sees while a scan runs: a progress bar of the scan's points, and a live
plot of the edge's answers read from its PVs (the stitched phase map for ptychography, the
Bragg-peak count per frame for HEDM)."""

from __future__ import annotations

import logging
import threading

import numpy as np
from bluesky.callbacks.core import CallbackBase

from edgeloop import ntnd

log = logging.getLogger(__name__)

__all__ = ["EdgeLivePlot", "ScanProgress"]


class ScanProgress(CallbackBase):
    """A tqdm progress bar over the points of each run, from its ``num_points`` metadata.

    Parameters
    ----------
    stream : str
        Event stream whose events count as points.
    **tqdm_kwargs
        Passed to :class:`tqdm.tqdm` (e.g. ``file=``, ``disable=``).
    """

    def __init__(self, stream: str = "primary", **tqdm_kwargs):
        super().__init__()
        self.stream, self.tqdm_kwargs = stream, tqdm_kwargs
        self.bar = None
        self._descriptors: set[str] = set()

    def start(self, doc):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=doc.get("num_points"),
            desc=doc.get("plan_name", "scan"),
            unit="pt",
            **self.tqdm_kwargs,
        )
        return doc

    def descriptor(self, doc):
        if doc.get("name") == self.stream:
            self._descriptors.add(doc["uid"])
        return doc

    def event(self, doc):
        if self.bar is not None and doc["descriptor"] in self._descriptors:
            self.bar.update(1)
        return doc

    def stop(self, doc):
        if self.bar is not None:
            self.bar.set_postfix_str(doc.get("exit_status", ""))
            self.bar.close()
            self.bar = None
        self._descriptors.clear()
        return doc


class EdgeLivePlot(CallbackBase):
    """Live plot of the edge server's answers during a run, read from its PVs.

    Ptychography runs show ``$(P)edge:PhaseMap``, the stitched predicted phase map, redrawn
    at each event; HEDM runs plot the number of Bragg peaks on ``$(P)edge:Peaks`` against the
    frame's uniqueId.  Other runs are left alone.  The edge answers a run's last frames after
    its last event: :meth:`redraw` shows them; :meth:`close` stops monitoring.

    Parameters
    ----------
    prefix : str
        PV prefix of the edge server.
    ax : matplotlib.axes.Axes, optional
        Where to draw; a new figure by default.
    context : p4p.client.thread.Context, optional
        pvAccess client; one of its own by default.
    """

    def __init__(self, prefix: str = "SIM:", ax=None, context=None):
        super().__init__()
        self.prefix, self._ax, self._ctx = prefix, ax, context
        self._own_ctx = context is None
        self._lock = threading.Lock()
        self._sub = None
        self.technique: str | None = None
        self.phase_map: np.ndarray | None = None
        self.peak_counts: dict[int, int] = {}
        self._artist = None
        self._updates = 0  # answers taken from the edge
        self._drawn = 0  # ... when the figure was last drawn: redrawn only when it changed
        self._since = 0.0

    def _current(self, value) -> bool:
        if isinstance(value, Exception):
            return False
        return ntnd.epoch_seconds(value) >= self._since

    @property
    def ax(self):
        if self._ax is None:
            import matplotlib.pyplot as plt

            _, self._ax = plt.subplots()
        return self._ax

    def _context(self):
        if self._ctx is None:
            from p4p.client.thread import Context

            self._ctx = Context("pva", nt=False)
        return self._ctx

    def start(self, doc):
        self._unsubscribe()
        self._since = doc["time"]  # what the edge published before this run is not its
        self.technique = doc.get("technique")
        if self.technique == "ptychography":
            self.phase_map, self._artist = None, None
            self._sub = self._context().monitor(f"{self.prefix}edge:PhaseMap", self._on_map)
        elif self.technique == "hedm":
            self.peak_counts, self._artist = {}, None
            request = "field()record[pipeline=true,queueSize=64]"  # a p4p server: each once
            pv = f"{self.prefix}edge:Peaks"
            self._sub = self._context().monitor(pv, self._on_peaks, request=request)
        return doc

    def _on_map(self, value) -> None:
        if self._current(value) and value["uniqueId"] > 0:
            with self._lock:
                self.phase_map = ntnd.decode(value).data.copy()
                self._updates += 1

    def _on_peaks(self, value) -> None:
        if not self._current(value):
            return
        uid = int(value["timeStamp.userTag"])
        labels = value["labels"]
        column = value["value"][labels[0]] if len(labels) else None
        if uid > 0:
            with self._lock:
                self.peak_counts[uid] = 0 if column is None else len(column)
                self._updates += 1

    def event(self, doc):
        self.redraw()
        return doc

    def redraw(self) -> None:
        """Draw what the edge sent since the last call; nothing when it sent nothing (an
        event per frame at hundreds of frames/s must not mean a figure drawn per frame)."""
        with self._lock:
            phase_map = self.phase_map
            counts = sorted(self.peak_counts.items())
            if self._updates == self._drawn:
                return
            self._drawn = self._updates
        if self.technique == "ptychography" and phase_map is not None:
            if self._artist is None:
                self._artist = self.ax.imshow(phase_map, cmap="gray")
                self.ax.set_title("stitched phase map (edge:PhaseMap)")
            else:
                self._artist.set_data(phase_map)
                self._artist.autoscale()
        elif self.technique == "hedm" and counts:
            uids, n = zip(*counts)
            if self._artist is None:
                (self._artist,) = self.ax.plot(uids, n, ".-")
                self.ax.set_xlabel("frame uniqueId")
                self.ax.set_ylabel("Bragg peaks (edge:Peaks)")
            else:
                self._artist.set_data(uids, n)
                self.ax.relim()
                self.ax.autoscale_view()
        else:
            return
        self.ax.figure.canvas.draw_idle()

    def stop(self, doc):
        # the monitor stays open until the next run: the edge answers the last frames after
        # the run's last event; redraw() shows them
        self.redraw()
        return doc

    def _unsubscribe(self) -> None:
        if self._sub is not None:
            self._sub.close()
            self._sub = None

    def close(self) -> None:
        """Stop monitoring and close the pvAccess context this plot opened."""
        self._unsubscribe()
        if self._own_ctx and self._ctx is not None:
            self._ctx.close()
            self._ctx = None
