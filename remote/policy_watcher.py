"""The retraining policy at work: ``PolicyWatcher`` follows the policy's live settings (the
ML IOC's ``ml:Auto*`` records) and the edge's ``edge:ScanConsistency``, hands each new
complete scan to the policy (remote/policy.py) with the edge's figure for it, and asks for a
retraining when the policy says so."""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
from collections.abc import Callable

from edgeloop import ntnd
from edgeloop.config import Config
from edgeloop.registry import Registry, RegistryCorrupt, atomic_write
from edgeloop.remote.gate import fmt
from edgeloop.remote.ml_pvs import fresh_values
from edgeloop.remote.policy import RetrainPolicy, Settings, quality_during
from edgeloop.remote.scan_index import scan_index
from edgeloop.scanfile import POSITIONS, read_scan

log = logging.getLogger(__name__)


def scan_facts(path: str):
    """(technique, positions, the frames' time stamps) of a scan."""
    scan = read_scan(path)
    return scan["technique"], scan[POSITIONS[scan["technique"]][0]], scan["timestamps"]


SETTINGS_FILE = "policy_settings.json"  # in the registry folder: the operator's last values


def _enum(value) -> dict:
    return {"value.index": int(value["value.index"])}


def _number(value) -> float:
    return float(value["value"])


# record -> (Settings field, the field's value, the value as it is written back)
SETTINGS = {
    "ml:AutoRetrain": ("enabled", lambda v: bool(v["value.index"]), _enum),
    "ml:AutoThreshold": ("threshold", _number, _number),
    "ml:AutoThresholdPx": ("threshold_px", _number, _number),
    "ml:AutoMinInterval": ("min_interval_s", _number, _number),
    "ml:AutoMinFrames": ("min_new_frames", lambda v: int(v["value"]), lambda v: int(v["value"])),
}


class PolicyWatcher:
    """``busy()`` says whether a retraining runs; ``request(reason)`` asks for one;
    ``keep(record, value)`` hears each setting an operator writes (written back to an IOC
    that restarted). The operator's settings are kept in the registry folder
    (``policy_settings.json``) and outlive a restart of the IOC or of the service: the
    value an IOC starts with does not replace them (:meth:`saved_settings` are written
    back)."""

    def __init__(
        self,
        cfg: Config,
        registry: Registry,
        busy: Callable[[], bool],
        request: Callable[[str], object],
        keep: Callable[[str, object], None] = lambda record, value: None,
    ):
        self.cfg, self.registry = cfg, registry
        self.busy, self.request, self.keep = busy, request, keep
        self.policy = RetrainPolicy(cfg.policy)
        self.settings = Settings.of(cfg.policy)  # the IOC's values once connected
        self._settings_file = cfg.registry_path / SETTINGS_FILE
        self.saved_settings = self._load_settings()
        self._lock = threading.Lock()
        # edge:ScanConsistency as posted: (time stamp, value), newest last
        self._edge_quality: collections.deque = collections.deque(maxlen=4000)
        self.known_scans: set[str] = set()
        self.scans = scan_index(cfg)  # each scan read once, not at every poll

    def callbacks(self) -> dict:
        """PV name -> monitor callback, for what the policy watches."""
        settings = {record: self._setting(record) for record in SETTINGS}
        return {**settings, "edge:ScanConsistency": self._on_quality}

    def _setting(self, record: str):
        """Monitor callback keeping one of the policy's live settings (the IOC holds them).
        The first value after a (re)connection is what the IOC started with: where the
        operator set another, that one stays (and is written back)."""
        name, convert, raw = SETTINGS[record]

        def on_value(value, first: bool) -> None:
            try:
                written = raw(value)
                if first and self.saved_settings.get(record, written) != written:
                    return  # the IOC's start value: the operator's is written back
                setattr(self.settings, name, convert(value))
            except (TypeError, ValueError, KeyError) as exc:
                log.warning("policy setting %s: %s", record, exc)
                return
            self.keep(record, written)
            if not first and self.saved_settings.get(record) != written:
                self.saved_settings[record] = written
                self._save_settings()

        return fresh_values(on_value)

    def _load_settings(self) -> dict:
        try:
            saved = json.loads(self._settings_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error(
                "policy settings %s unreadable (%s): the IOC's are used", self._settings_file, exc
            )
            return {}
        return {k: v for k, v in saved.items() if k in SETTINGS} if isinstance(saved, dict) else {}

    def _save_settings(self) -> None:
        try:
            atomic_write(self._settings_file, json.dumps(self.saved_settings, indent=2).encode())
        except OSError as exc:
            log.error("policy settings not saved to %s: %s", self._settings_file, exc)

    def _on_quality(self, value) -> None:
        if isinstance(value, Exception):
            return
        self._edge_quality.append((ntnd.epoch_seconds(value), float(value["value"])))

    def scan_quality(self, path: str, stamps, newest: bool) -> float | None:
        """The edge's figure for this scan, by the frames' time stamps; when none falls in
        the scan (e.g. the detector's clock is not the edge's), the latest for the newest
        scan, with a warning, and None for older ones."""
        history = list(self._edge_quality)
        if len(stamps):
            settle = 2 * self.cfg.edge.stats_publish_s
            quality = quality_during(history, float(stamps[0]), float(stamps[-1]), settle)
            if quality is not None:
                return quality
        if not newest:
            return None
        latest = next((v for _, v in reversed(history) if math.isfinite(v)), None)
        if latest is not None:
            log.warning(
                "policy: no edge:ScanConsistency posted during %s (clocks apart?): "
                "taking the latest, %.4g",
                path,
                latest,
            )
        return latest

    def trained(self, technique: str, scans: list[str]) -> None:
        """The policy's training set is what this retraining staged."""
        positions = []
        for path in scans:
            try:
                positions.append(scan_facts(path)[1])
            except (OSError, KeyError, ValueError) as exc:
                log.warning("policy: positions of %s unreadable: %s", path, exc)
        with self._lock:
            self.known_scans.update(scans)
            self.policy.trained(technique, positions, time.monotonic())

    def trained_at_start(self) -> None:
        """What the serving models were trained on is the policy's training set at start."""
        for kind in ("ptychonn", "braggnn"):
            try:
                version = self.registry.accepted(kind)
            except RegistryCorrupt as exc:
                log.error("policy: what the serving models were trained on is unknown: %s", exc)
                return
            if version is None:
                continue
            scans = [str(p) for p in self.registry.meta(version).get("trained_on") or []]
            positions = []
            for path in scans:
                try:
                    technique, pos, _ = scan_facts(path)
                    positions.append(pos)
                except (OSError, KeyError, ValueError):
                    continue  # moved or deleted since: its frames are not here to compare
            if positions:
                with self._lock:
                    self.known_scans.update(scans)
                    self.policy.trained(technique, positions, now=None)

    def run(self, stop: threading.Event) -> None:
        """Every ``policy.poll_s`` until ``stop``: one :meth:`step`."""
        while not stop.wait(self.cfg.policy.poll_s):
            try:
                self.step()
            except Exception:  # the policy must never stop the service
                log.exception("retraining policy failed")

    def step(self) -> None:
        """New complete scans go to the policy with the edge's label-free quality of each,
        and the policy decides."""
        new = [
            (path, technique)
            for path, technique, _ in reversed(self.scans.usable(self.cfg.data_path))
            if path not in self.known_scans
        ]
        for path, technique in new:
            self.known_scans.add(path)
            try:
                _, positions, stamps = scan_facts(path)
            except (OSError, KeyError, ValueError) as exc:
                log.warning("policy: skipping scan %s: %s", path, exc)
                continue
            quality = self.scan_quality(path, stamps, newest=path == new[-1][0])
            with self._lock:
                scan = self.policy.observe(path, technique, positions, quality)
            log.info(
                "policy: new %s scan %s, %d frames (%d unlike the training set), "
                "edge:ScanConsistency %s",
                technique,
                path,
                len(scan.positions),
                scan.unlike,
                fmt(quality),
            )
        if self.busy():
            return
        with self._lock:
            now = time.monotonic()
            reason = self.policy.decide(self.settings, now)
            if reason:  # a retraining that fails before staging is asked again only after
                self.policy.last_start = now  # ml:AutoMinInterval, not at every poll
        if reason:
            self.request(reason)
