"""The edge's scalar status PVs, with the display metadata (units, precision, limits,
description) and alarm limits a client shows, and the severity each value gets."""

from __future__ import annotations

import time
from dataclasses import dataclass

from p4p import Value
from p4p.nt import NTScalar
from p4p.server.thread import SharedPV

from edgeloop.config import EdgeConfig


@dataclass(frozen=True)
class Scalar:
    code: str  # NTScalar type: "l" (int64) or "d"
    units: str
    precision: int
    description: str
    high: float | None = None  # above: MINOR
    hihi: float | None = None  # above: MAJOR
    limit_high: float = 0.0  # display range top (0: open)

    def severity(self, value: float) -> int:
        if self.hihi is not None and value > self.hihi:
            return 2
        if self.high is not None and value > self.high:
            return 1
        return 0

    def nt(self) -> NTScalar:
        return NTScalar(self.code, display=True, form=True, valueAlarm=self.high is not None)

    def initial(self, nt: NTScalar, value=0) -> Value:
        v = nt.wrap(value)
        v["display.units"] = self.units
        v["display.precision"] = self.precision
        v["display.description"] = self.description
        v["display.limitHigh"] = self.limit_high
        if self.high is not None:
            v["valueAlarm.active"] = True
            v["valueAlarm.highWarningLimit"] = self.high
            v["valueAlarm.highWarningSeverity"] = 1
            v["valueAlarm.highAlarmLimit"] = self.hihi
            v["valueAlarm.highAlarmSeverity"] = 2
        return v


def consistency_scalars(cfg: EdgeConfig, mode: str) -> dict[str, Scalar]:
    """edge:Consistency and edge:ScanConsistency in a mode: the figure (edge_pva/label_free.py)
    and its units and alarm limits are the technique's."""
    if mode == "hedm":
        units, warn, alarm = "px", cfg.consistency_warn_px, cfg.consistency_alarm_px
        what = "distance of BraggNN's centres from the patch centroids"
    else:
        units, warn, alarm = "rad", cfg.consistency_warn_rad, cfg.consistency_alarm_rad
        what = "phase disagreement with the map and the frame"
    return {
        "Consistency": Scalar("d", units, 3, f"Last frame's {what}", limit_high=alarm),
        "ScanConsistency": Scalar(
            "d",
            units,
            3,
            f"Scan mean of the {what}",
            high=warn,
            hihi=alarm,
            limit_high=alarm,
        ),
    }


def scalars(cfg: EdgeConfig, mode: str = "ptycho") -> dict[str, Scalar]:
    frames = "frames"
    return {
        **consistency_scalars(cfg, mode),
        "FramesIn": Scalar("l", frames, 0, "New frames received"),
        "FramesOut": Scalar("l", frames, 0, "Frames answered"),
        "Dropped": Scalar("l", frames, 0, "Frames dropped (queue full)"),
        "BadFrames": Scalar("l", frames, 0, "Frames refused (see Message)"),
        "InFlight": Scalar("l", frames, 0, "Frames queued or being handled"),
        "MissedFrames": Scalar("l", frames, 0, "UniqueIds the source skipped"),
        "Repeats": Scalar("l", frames, 0, "Frames received again, refused"),
        "ModelVersion": Scalar("l", "", 0, "Model version serving this mode"),
        "PeakCount": Scalar("l", "peaks", 0, "Bragg peaks in the last frame"),
        "Restarts": Scalar("l", "", 0, "Edge worker threads that died", high=0, hihi=0),
        "FrameRate": Scalar("d", "frames/s", 1, "Frames answered per second", limit_high=2000),
        "LatencyMs": Scalar(
            "d",
            "ms",
            1,
            "Median latency, arrival to answer",
            high=cfg.latency_warn_ms,
            hihi=cfg.latency_alarm_ms,
            limit_high=cfg.latency_alarm_ms,
        ),
        "DroppedRate": Scalar(
            "d",
            "frames/s",
            1,
            "Frames dropped per second",
            high=0.0,
            hihi=cfg.dropped_rate_alarm,
            limit_high=cfg.dropped_rate_alarm,
        ),
    }


class ScalarPVs:
    """One SharedPV per scalar; ``post`` sets the value with its severity and time stamp."""

    def __init__(self, cfg: EdgeConfig, mode: str = "ptycho"):
        self.cfg = cfg
        self.meta = scalars(cfg, mode)
        self.pvs = {}
        self._nts = {}
        for name, scalar in self.meta.items():
            nt = self._nts[name] = scalar.nt()
            self.pvs[name] = SharedPV(nt=nt, initial=scalar.initial(nt))

    def post(self, name: str, value) -> None:
        """Post with its severity and the time now (p4p leaves the time stamp 0 unless
        given; clients, archivers and the retraining policy read it)."""
        severity = self.meta[name].severity(value)
        message = "HIGH" if severity else ""
        self.pvs[name].post(value, severity=severity, message=message, timestamp=time.time())

    def set_mode(self, mode: str) -> None:
        """Units, limits and description of the consistency PVs as ``mode`` has them; their
        value NaN (not known) until a frame of that mode gives one."""
        for name, scalar in consistency_scalars(self.cfg, mode).items():
            if scalar != self.meta[name]:
                self.meta[name] = scalar
                value = scalar.initial(self._nts[name], float("nan"))
                self.pvs[name].post(value, severity=0, message="", timestamp=time.time())
