"""When to retrain without being asked: the retraining policy of the service.

The service shows it each new complete scan (its technique, positions and the edge's
label-free quality of it, ``edge:ScanConsistency``) and asks it, with the live settings the
IOC holds (``ml:AutoRetrain``, ``ml:AutoThreshold``, ``ml:AutoMinInterval``,
``ml:AutoMinFrames``), whether to retrain now.  It answers with the reason, which becomes
the trigger the service records, or None.

Two reasons, both only for scans not trained on yet, of the technique of the newest one:

- quality: a new scan's ``edge:ScanConsistency`` is above the technique's threshold (the
  serving model's answers disagree with each other where scan points overlap, or do not
  explain the frames; for HEDM its centres stray from the peaks' centroids);
- data: enough new frames are unlike the training set (no trained frame lies within
  ``novelty_um`` of their stage position, or ``novelty_deg`` of their rotation angle).

Never sooner than the minimum interval after the last retraining, whatever started it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from edgeloop.config import PolicyConfig


@dataclass
class Settings:
    """The policy's live settings (the IOC's policy records)."""

    enabled: bool
    threshold: float  # ptychography, rad
    threshold_px: float  # HEDM
    min_interval_s: float
    min_new_frames: int

    @classmethod
    def of(cls, cfg: PolicyConfig) -> Settings:
        return cls(
            cfg.enabled, cfg.threshold, cfg.threshold_px, cfg.min_interval_s, cfg.min_new_frames
        )

    def threshold_of(self, technique: str) -> tuple[float, str]:
        """The quality threshold of a technique and its PV."""
        if technique == "hedm":
            return self.threshold_px, "ml:AutoThresholdPx"
        return self.threshold, "ml:AutoThreshold"


@dataclass
class NewScan:
    path: str
    technique: str
    positions: np.ndarray  # (N, 2) stage x, y in um, or (N, 1) rotation in degrees
    quality: float | None  # edge:ScanConsistency when the scan ended; None: not known
    unlike: int = 0  # frames no trained frame is near


@dataclass
class RetrainPolicy:
    cfg: PolicyConfig
    pending: list[NewScan] = field(default_factory=list)
    last_start: float | None = None  # time.monotonic() of the last retraining's start
    _trained: dict[str, np.ndarray] = field(default_factory=dict)  # technique -> positions
    _trees: dict[str, cKDTree] = field(default_factory=dict)

    def radius(self, technique: str) -> float:
        return self.cfg.novelty_deg if technique == "hedm" else self.cfg.novelty_um

    def unlike(self, technique: str, positions: np.ndarray) -> int:
        """How many of ``positions`` lie farther than the novelty radius from every trained
        frame's position."""
        positions = _rows(positions)
        tree = self._trees.get(technique)
        if tree is None:
            return len(positions)
        dist, _ = tree.query(positions, k=1, distance_upper_bound=self.radius(technique))
        return int(np.isinf(dist).sum())

    def observe(
        self, path: str, technique: str, positions: np.ndarray, quality: float | None
    ) -> NewScan:
        """A new complete scan has arrived."""
        if quality is not None and not np.isfinite(quality):
            quality = None
        scan = NewScan(str(path), technique, _rows(positions), quality)
        scan.unlike = self.unlike(technique, scan.positions)
        self.pending.append(scan)
        return scan

    def trained(self, technique: str, positions: list[np.ndarray], now: float | None) -> None:
        """A retraining of ``technique`` started (at ``now``; None: before this service
        started) on these scans' positions: they are the training set (the buffer is what
        was staged), and the technique's pending scans are consumed (trained on, or older
        than the buffer holds)."""
        if now is not None:
            self.last_start = now
        rows = [_rows(p) for p in positions if len(p)]
        if rows:
            self._trained[technique] = np.concatenate(rows)
            self._trees[technique] = cKDTree(self._trained[technique])
        self.pending = [s for s in self.pending if s.technique != technique]
        for scan in self.pending:  # other techniques: nothing changes for them
            scan.unlike = self.unlike(scan.technique, scan.positions)

    def decide(self, settings: Settings, now: float) -> str | None:
        """The reason to retrain now, or None."""
        if not settings.enabled or not self.pending:
            return None
        if self.last_start is not None and now - self.last_start < settings.min_interval_s:
            return None
        technique = self.pending[-1].technique
        scans = [s for s in self.pending if s.technique == technique]
        worst = max(
            (s for s in scans if s.quality is not None),
            key=lambda s: s.quality,
            default=None,
        )
        threshold, pv = settings.threshold_of(technique)
        if worst is not None and worst.quality > threshold:
            return (
                f"policy: edge:ScanConsistency {worst.quality:.4g} > {pv} "
                f"{threshold:.4g} (scan {_name(worst.path)})"
            )
        unlike = sum(s.unlike for s in scans)
        if unlike >= settings.min_new_frames:
            return (
                f"policy: {unlike} new {technique} frames unlike the training set "
                f">= ml:AutoMinFrames {settings.min_new_frames} ({len(scans)} scan(s))"
            )
        return None


def quality_during(history, t_first: float, t_last: float, settle_s: float = 1.0) -> float | None:
    """The edge's ``ScanConsistency`` of a scan: of ``history``, (time stamp, value) pairs
    in posting order, the last finite value posted while the scan's frames came
    (``t_first`` .. ``t_last``, the frames' time stamps) or up to ``settle_s`` after, when
    the running mean holds the last frames; None if none was.  A value posted later may
    already be the next scan's (the edge restarts the figure with each acquisition)."""
    for stamp, value in reversed(history):
        if t_first <= stamp <= t_last + settle_s and np.isfinite(value):
            return float(value)
    return None


def _rows(positions: np.ndarray) -> np.ndarray:
    """(N, D) positions, the rows holding NaN/Inf left out."""
    p = np.asarray(positions, np.float64)
    p = p.reshape(len(p), -1)
    return p[np.isfinite(p).all(axis=1)]


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


__all__ = ["NewScan", "RetrainPolicy", "Settings", "quality_during"]
