"""Bluesky callback writing each ptychography or HEDM run to one HDF5 file, and its reader."""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from bluesky.callbacks.core import CallbackBase

from edgeloop.scanfile import POSITIONS, SCAN_DATASETS, read_scan

log = logging.getLogger(__name__)

__all__ = ["SCAN_DATASETS", "RetrainTrigger", "ScanWriter", "read_scan"]


@dataclass
class _Keys:
    image: str
    axes: tuple[str, ...]  # motor readback keys, in the order of the positions dataset
    unique_id: str | None
    shape: tuple[int, ...]


@dataclass
class _Run:
    start: dict
    keys: _Keys | None = None
    frames: list = field(default_factory=list)
    positions: list = field(default_factory=list)
    unique_ids: list = field(default_factory=list)
    timestamps: list = field(default_factory=list)


def _image_key(data_keys: dict, detectors: list[str], object_keys: dict) -> str:
    """The 2-D array data key, preferring the named detectors' ``*_image`` keys."""
    arrays = [
        k
        for k, v in data_keys.items()
        if v.get("dtype") == "array" and len(v.get("shape") or []) == 2
    ]
    preferred = [k for d in detectors for k in object_keys.get(d, []) if k in arrays]
    for candidates in (preferred, arrays):
        named = [k for k in candidates if k.endswith("image")]
        if named or candidates:
            return (named or candidates)[0]
    raise ValueError(f"no 2-D array (image) among the data keys {sorted(data_keys)}")


def _motor_keys(start: dict, descriptor: dict, n: int) -> tuple[str, ...]:
    """Data keys of the first ``n`` motor readbacks: start hints, then descriptor hints /
    object_keys, then (two axes) keys ending in ``_x`` / ``_y``."""
    data_keys = descriptor["data_keys"]
    dims = start.get("hints", {}).get("dimensions") or []
    from_dims = [
        fields[0]
        for fields, stream in dims
        if stream == descriptor.get("name", "primary") and fields and fields[0] in data_keys
    ]
    if len(from_dims) >= n:
        return tuple(from_dims[:n])
    motors = list(start.get("motors") or [])
    hints = descriptor.get("hints") or {}
    object_keys = descriptor.get("object_keys") or {}
    found = []
    for m in motors[:n]:
        candidates = [k for k in (hints.get(m, {}).get("fields") or []) if k in data_keys]
        candidates += [m] if m in data_keys else []
        candidates += [
            k
            for k in object_keys.get(m, [])
            if k in data_keys and not k.endswith(("setpoint", "_user_setpoint"))
        ]
        if candidates:
            found.append(candidates[0])
    if len(found) == n:
        return tuple(found)
    if n == 2:
        xs = [k for k in data_keys if k.endswith("_x") or k == "x"]
        ys = [k for k in data_keys if k.endswith("_y") or k == "y"]
        if xs and ys:
            return xs[0], ys[0]
    raise ValueError(
        f"cannot tell the {n} motor readback(s) of {motors} among {sorted(data_keys)}"
    )


class ScanWriter(CallbackBase):
    """Write each ptychography or HEDM run to ``<data_dir>/scan_<scan_id>_<uid8>.h5``.

    Runs whose start document has no ``technique`` of ``'ptychography'`` or ``'hedm'`` are
    ignored.  Events of
    the ``primary`` stream are kept in memory; at the stop document the file is written to
    a temporary name in ``data_dir`` and renamed into place, so readers never see a partial
    file.  Failed or aborted runs are written too, with their ``exit_status``.

    Parameters
    ----------
    data_dir : str or os.PathLike
        Output directory (created if missing; ``~`` is expanded).
    stream : str
        Event stream to record.

    Attributes
    ----------
    last_path : pathlib.Path or None
        The file of the latest finished run.
    paths : list of pathlib.Path
        All files written by this callback.

    Notes
    -----
    Datasets: ``frames`` (N, ny, nx, detector dtype), ``unique_id`` (N,), ``timestamps`` (N,;
    the frame timestamps, seconds since the epoch) and the motor readbacks: ``positions_um``
    (N, 2; x, y) for ptychography, ``omega_deg`` (N,) for HEDM.  Attributes: ``technique``,
    ``start_json``, ``plan_name``, ``uid``, ``scan_id``, ``exit_status``, ``num_events`` (and
    ``reason`` from the stop document).
    """

    def __init__(self, data_dir: str | os.PathLike, stream: str = "primary"):
        super().__init__()
        self.data_dir = Path(data_dir).expanduser()
        self.stream = stream
        self.last_path: Path | None = None
        self.paths: list[Path] = []
        self._runs: dict[str, _Run] = {}
        self._descriptors: dict[str, str] = {}  # descriptor uid -> run start uid

    def start(self, doc):
        if doc.get("technique") in POSITIONS:
            self._runs[doc["uid"]] = _Run(start=doc)
        return doc

    def descriptor(self, doc):
        run = self._runs.get(doc["run_start"])
        if run is None or doc.get("name", "primary") != self.stream:
            return doc
        data_keys = doc["data_keys"]
        detectors = list(run.start.get("detectors") or [])
        object_keys = doc.get("object_keys") or {}
        image = _image_key(data_keys, detectors, object_keys)
        axes = _motor_keys(run.start, doc, POSITIONS[run.start["technique"]][1])
        uid_keys = [k for k in data_keys if k.endswith("unique_id")]
        run.keys = _Keys(
            image=image,
            axes=axes,
            unique_id=uid_keys[0] if uid_keys else None,
            shape=tuple(data_keys[image]["shape"]),
        )
        self._descriptors[doc["uid"]] = doc["run_start"]
        log.debug("ScanWriter: image %s, axes %s, uid %s", image, axes, run.keys.unique_id)
        return doc

    def event(self, doc):
        start_uid = self._descriptors.get(doc["descriptor"])
        if start_uid is None:
            return doc
        run = self._runs[start_uid]
        keys, data = run.keys, doc["data"]
        frame = data[keys.image]
        if isinstance(frame, str) or (doc.get("filled") or {}).get(keys.image) is False:
            log.warning(
                "ScanWriter: event %s has an unfilled (external) image; skipped",
                doc.get("seq_num"),
            )
            return doc
        run.frames.append(np.asarray(frame))
        run.positions.append(tuple(float(data[k]) for k in keys.axes))
        run.unique_ids.append(
            int(data[keys.unique_id])
            if keys.unique_id
            else int(doc.get("seq_num", len(run.frames)))
        )
        run.timestamps.append(float(doc.get("timestamps", {}).get(keys.image, doc["time"])))
        return doc

    def stop(self, doc):
        run = self._runs.pop(doc["run_start"], None)
        if run is None:
            return doc
        self._descriptors = {d: s for d, s in self._descriptors.items() if s != doc["run_start"]}
        try:
            self.last_path = self._write(run, doc)
            self.paths.append(self.last_path)
        except Exception:
            log.exception("ScanWriter: could not write run %s", doc["run_start"])
            raise
        return doc

    def _write(self, run: _Run, stop: dict) -> Path:
        start = run.start
        scan_id = start.get("scan_id", 0)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / f"scan_{scan_id}_{start['uid'][:8]}.h5"
        shape = run.keys.shape if run.keys else (0, 0)
        if run.frames:
            frames = np.stack(run.frames)
        else:
            frames = np.zeros((0, *shape), dtype=np.int32)
        exit_status = stop.get("exit_status", "unknown")
        technique = start["technique"]
        positions_name, n_axes = POSITIONS[technique]
        positions = np.asarray(run.positions, dtype=float).reshape(-1, n_axes)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with h5py.File(tmp, "w") as f:
                f.create_dataset(
                    "frames", data=frames, chunks=(1, *frames.shape[1:]) if frames.size else None
                )
                f.create_dataset(positions_name, data=positions if n_axes > 1 else positions[:, 0])
                f.create_dataset("unique_id", data=np.asarray(run.unique_ids, dtype=np.int64))
                f.create_dataset("timestamps", data=np.asarray(run.timestamps, dtype=float))
                f.attrs["technique"] = technique
                f.attrs["start_json"] = json.dumps(start, default=repr)
                f.attrs["plan_name"] = str(start.get("plan_name", ""))
                f.attrs["uid"] = start["uid"]
                f.attrs["scan_id"] = int(scan_id)
                f.attrs["exit_status"] = str(exit_status)
                f.attrs["reason"] = str(stop.get("reason", ""))
                f.attrs["num_events"] = len(run.frames)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        level = logging.INFO if exit_status == "success" else logging.WARNING
        log.log(
            level,
            "ScanWriter: wrote %s (%d frames, exit_status %s)",
            path,
            len(run.frames),
            exit_status,
        )
        return path


class RetrainTrigger(CallbackBase):
    """Request retraining from a RunEngine subscription: ``RE.subscribe(RetrainTrigger("SIM:"))``.

    Counts runs of a known technique (ptychography, hedm) and their events (frames); when a
    run stops successfully it requests retraining if ``every_n_runs`` runs have finished, or
    — with ``every_n_frames`` set — once that many new frames have been collected.  The
    request writes 1 to ``$(P)ml:Retrain`` over pvAccess; the retraining service coalesces
    requests that arrive while it trains into one follow-up.

    Parameters
    ----------
    prefix : str
        PV prefix of the ML IOC.
    every_n_runs : int
        Request after every N-th finished run (1: after each).  Ignored when
        ``every_n_frames`` is given.
    every_n_frames : int, optional
        Request once at least this many frames were collected since the last request.
    request : callable, optional
        Called instead of the PV write (e.g. ``RetrainService.request``).
    """

    def __init__(
        self,
        prefix: str = "SIM:",
        every_n_runs: int = 1,
        every_n_frames: int | None = None,
        request=None,
    ):
        super().__init__()
        if every_n_runs < 1 or (every_n_frames is not None and every_n_frames < 1):
            raise ValueError("every_n_runs and every_n_frames must be >= 1")
        self.prefix, self.every_n_runs, self.every_n_frames = prefix, every_n_runs, every_n_frames
        self._request = request
        self._ctx = None
        self._runs: set[str] = set()
        self.finished_runs = self.frames = self.requests = 0

    def start(self, doc):
        if doc.get("technique") in POSITIONS:
            self._runs.add(doc["uid"])
        return doc

    def descriptor(self, doc):
        if doc["run_start"] in self._runs and doc.get("name", "primary") == "primary":
            self._runs.add(doc["uid"])
        return doc

    def event(self, doc):
        if doc["descriptor"] in self._runs:
            self.frames += 1
        return doc

    def stop(self, doc):
        if doc["run_start"] not in self._runs:
            return doc
        self._runs.discard(doc["run_start"])
        if doc.get("exit_status") != "success":
            return doc
        self.finished_runs += 1
        if self.every_n_frames is not None:
            due = self.frames >= self.every_n_frames
        else:
            due = self.finished_runs % self.every_n_runs == 0
        if due:
            self.frames = 0
            self.fire()
        return doc

    def fire(self) -> None:
        self.requests += 1
        if self._request is not None:
            self._request()
            return
        from p4p.client.thread import Context

        if self._ctx is None:
            self._ctx = Context("pva", nt=False)
        try:
            self._ctx.put(f"{self.prefix}ml:Retrain", {"value.index": 1}, timeout=5)
            log.info("RetrainTrigger: requested retraining (%sml:Retrain)", self.prefix)
        except Exception as exc:  # never break the scan over this
            log.error("RetrainTrigger: cannot write %sml:Retrain: %s", self.prefix, exc)
