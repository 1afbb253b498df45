"""Which scans can be trained on: ``ScanIndex.usable(data_dir)`` of the data directory's
files, ``TiledScans`` of the runs stored in Tiled; :func:`scan_index` picks by the
configuration.

The retraining policy asks every poll (2 s) over a beamtime of thousands of scans, so each
scan file or run entry is read once (again only when its size or time changes), one that
cannot be used is tried again at most every ``retry_s`` (a run entry whose detector file is
still being written), and the reason it cannot is logged once per scan and reason.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from edgeloop import tiled_runs
from edgeloop.scanfile import list_scans, scan_summary

log = logging.getLogger(__name__)

MIN_FRAMES = 4  # fewer cannot be phase-retrieved together, nor split for validation


@dataclass
class _Seen:
    key: tuple[int, int]  # (mtime_ns, size) when read
    summary: tuple[str, int] | None  # (technique, frames), None if unusable
    problem: str | None
    checked: float  # monotonic


class ScanIndex:
    def __init__(self, retry_s: float = 60.0):
        self.retry_s = retry_s
        self.where = "the data directory"
        self.reads = 0  # files read so far (what the index saves)
        self._seen: dict[str, _Seen] = {}
        self._warned: set[tuple[str, str]] = set()

    def usable(self, data_dir: str | Path) -> list[tuple[str, str, int]]:
        """(path, technique, frames) of the complete, consistent scans with at least
        MIN_FRAMES frames, newest first; the first one's technique is what the beamline is
        doing now."""
        now, out = time.monotonic(), []
        listed = [str(p) for p in list_scans(data_dir)]
        for path in reversed(listed):
            summary = self._summary(path, now)
            if summary is not None and summary[1] >= MIN_FRAMES:
                out.append((path, *summary))
        for gone in set(self._seen) - set(listed):
            del self._seen[gone]
        return out

    def _summary(self, path: str, now: float) -> tuple[str, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None  # removed since it was listed
        key = (st.st_mtime_ns, st.st_size)
        seen = self._seen.get(path)
        if seen is None or seen.key != key or (seen.problem and now - seen.checked > self.retry_s):
            self.reads += 1
            try:
                seen = _Seen(key, scan_summary(path), None, now)
            except (OSError, KeyError, ValueError) as exc:
                seen = _Seen(key, None, str(exc), now)
            self._seen[path] = seen
        if seen.problem and (path, seen.problem) not in self._warned:
            self._warned.add((path, seen.problem))
            log.warning("skipping scan %s: %s", path, seen.problem)
        return seen.summary


def usable_scans(data_dir) -> list[tuple[str, str, int]]:
    """:meth:`ScanIndex.usable` once, with an index of its own."""
    return ScanIndex().usable(data_dir)


class TiledScans:
    """:meth:`ScanIndex.usable` for runs stored in Tiled (``[tiled]`` enabled): the runs
    :class:`edgeloop.tiled_runs.TiledRuns` finds, by reference.  While the server does not
    answer (starting, restarting, down), the runs found before are what there is; the
    outage is logged once, and its end."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.where = f"Tiled at {tiled_runs.server_uri(cfg.tiled)}"
        self._runs: tiled_runs.TiledRuns | None = None
        self._last: list[tuple[str, str, int]] = []
        self._down: str | None = None

    def usable(self, data_dir=None) -> list[tuple[str, str, int]]:
        try:
            if self._runs is None:
                self._runs = tiled_runs.TiledRuns(
                    tiled_runs.connect(self.cfg.tiled, self.cfg.data_path)
                )
            self._last = self._runs.usable(MIN_FRAMES)
        except Exception as exc:  # httpx's and Tiled's errors: the server is not there now
            if self._down is None:
                log.warning("%s does not answer (%s); runs found before: %d",
                            self.where, exc, len(self._last))  # fmt: skip
            self._down = str(exc)
            return self._last
        if self._down is not None:
            log.info("%s answers again", self.where)
            self._down = None
        return self._last


def scan_index(cfg) -> ScanIndex | TiledScans:
    """Where the retraining and its policy find runs: Tiled when ``[tiled]`` is enabled,
    else the data directory's scan files and run entries."""
    if cfg.tiled.enabled:
        return TiledScans(cfg)
    index = ScanIndex()
    index.where = str(cfg.data_path)
    return index
