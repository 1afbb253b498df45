"""What the edge says about itself, every ``edge.stats_publish_s``:

- ``EdgeStatistics``: the counters from one snapshot of the frame queue (FramesIn =
  FramesOut + Dropped + BadFrames + InFlight), MissedFrames, Repeats, FrameRate, LatencyMs,
  DroppedRate, the consistency figures, the stitched map, and one summary per
  ``edge.bad_frame_report_s`` of the frames refused or answered with a caveat (``notes``);
- ``InputWatch``: edge:Message when the input disconnects, stays away, and comes back."""

from __future__ import annotations

import collections
import logging
import threading
import time

import numpy as np

from edgeloop.config import search_hint

log = logging.getLogger(__name__)


class EdgeStatistics:
    def __init__(self, edge):
        self.edge = edge
        self.latencies: collections.deque = collections.deque(maxlen=2000)  # ms, newest last
        self._out_times: collections.deque = collections.deque(maxlen=2000)
        self._dropped: collections.deque = collections.deque()  # (time, count), last 2 s
        # frames answered with a caveat (not stitched, peaks left out): reason -> count
        self._notes: collections.Counter = collections.Counter()
        self._notes_lock = threading.Lock()  # frame threads add, the stats thread takes
        self._last_report = time.monotonic()

    def note(self, caveat: str) -> None:
        """Count a frame answered with a caveat, for the next summary."""
        with self._notes_lock:
            self._notes[caveat] += 1

    def count_out(self, frame, now: float) -> None:
        """Count a frame answered at ``now`` and its latency since it arrived."""
        frame.settled = True
        self.edge.queue.settle_answered()
        self.latencies.append((now - frame.received) * 1e3)
        self._out_times.append(now)

    def run(self) -> None:
        edge = self.edge
        while not edge._stop.wait(edge.cfg.edge.stats_publish_s):
            now = time.monotonic()  # rates and intervals: immune to steps of the host's clock
            for name, value in self._values(now).items():
                edge.pvs.scalars.post(name, value)
            with edge.stitcher.lock:  # a mode switch changes their units: not in between
                last, scan = edge.stitcher.consistency.last, edge.stitcher.consistency.mean
                if scan is not None:  # posted once a scan has a figure
                    edge.pvs.scalars.post("Consistency", last)
                    edge.pvs.scalars.post("ScanConsistency", scan)
            self._report_refusals()
            edge.input.watch()
            edge.stitcher.publish_map(edge.pvs["PhaseMap"].post, now, edge.cfg.edge.map_publish_s)

    def _values(self, now: float) -> dict:
        queue, ids = self.edge.queue, self.edge.frame_ids
        recent = [t for t in list(self._out_times) if now - t <= 2.0]
        lat = list(self.latencies)[-100:]
        self._dropped.append((now, queue.dropped))
        while now - self._dropped[0][0] > 2.0:
            self._dropped.popleft()
        counts = queue.counts()  # one snapshot: the counts add up
        return {
            "FramesIn": counts["in"],
            "FramesOut": counts["out"],
            "Dropped": counts["dropped"],
            "BadFrames": counts["bad"],
            "InFlight": counts["in_flight"],
            "MissedFrames": ids.missed,
            "Repeats": ids.repeats,
            "FrameRate": len(recent) / 2.0,
            "LatencyMs": float(np.median(lat)) if lat else 0.0,
            "DroppedRate": (self._dropped[-1][1] - self._dropped[0][1]) / 2.0,
        }

    def _report_refusals(self) -> None:
        """One summary per ``edge.bad_frame_report_s`` of the frames refused or answered
        with a caveat since the last one, never a line per frame."""
        now = time.monotonic()
        span = now - self._last_report
        if span < self.edge.cfg.edge.bad_frame_report_s:
            return
        refused = self.edge.queue.take_reasons()
        with self._notes_lock:
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
        self.edge.pvs.message(msg, severity, logged=False)


class InputWatch:
    """The input PV's connection, as edge:Message says it."""

    def __init__(self, edge, grace_s: float = 5.0):
        self.edge, self.grace_s = edge, grace_s
        self.since: float | None = time.monotonic()  # not connected since
        self._seen = False  # a frame has arrived since start
        self._reported = False

    @property
    def connected(self) -> bool:
        return self.since is None

    def disconnected(self) -> None:
        if self.since is None:
            self.edge.pvs.message(f"input {self.edge.input_pv} disconnected", 1)
            self.since = time.monotonic()

    def back(self) -> None:
        """First frame after a disconnection: clear the alarm, say how long it was away."""
        away = time.monotonic() - self.since
        self.since = None
        if self._seen:
            msg = (
                f"input {self.edge.input_pv} back after {away:.1f} s; frames it skipped are "
                f"counted in MissedFrames ({self.edge.frame_ids.missed} so far)"
            )
            self.edge.pvs.message(msg, 0)
        self._seen = True

    def watch(self) -> None:
        """Say once which PV the edge cannot reach, and where it searched."""
        if self.since is None:
            self._reported = False
        elif not self._reported and time.monotonic() - self.since > self.grace_s:
            self._reported = True
            msg = (
                f"input {self.edge.input_pv} not connected for {self.grace_s:.0f} s; "
                f"{search_hint()}"
            )
            self.edge.pvs.message(msg, 1)
