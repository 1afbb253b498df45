"""Bluesky callback writing each ptychography or HEDM run to one HDF5 file, and its reader."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from bluesky.callbacks.core import CallbackBase

from edgeloop.scanfile import PART, POSITIONS, SCAN_DATASETS, read_scan

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
    path: Path | None = None  # the final name; the file grows at path + PART until the stop
    file: h5py.File | None = None
    datasets: dict = field(default_factory=dict)  # kept open: a write error raises at flush
    n: int = 0  # events written
    error: str | None = None  # why the file stopped growing


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ScanWriter(CallbackBase):
    """Write each ptychography or HEDM run to ``<data_dir>/scan_<scan_id>_<uid8>.h5``.

    Runs whose start document has no ``technique`` of ``'ptychography'`` or ``'hedm'`` are
    ignored.  Each event of the ``primary`` stream is appended to ``<name>.h5.part`` and
    flushed (HDF5 in SWMR mode: the file stays readable if the process dies, with ``complete``
    false and the ``num_events`` written so far); at the stop document the file is completed,
    fsynced and renamed to ``<name>.h5``, so a ``scan_*.h5`` is never half-written.  Failed
    or aborted runs are written too, with their ``exit_status``.  A write error (a full disk)
    never stops the scan: it is logged, kept in :attr:`errors`, and the ``.part`` file keeps
    the frames written so far, marked incomplete.  Writing stops before the disk is full
    (less than the next frame + ``reserve_bytes`` free), so the file can still be closed.

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
    errors : list of str
        Write errors (one per run at most).

    Notes
    -----
    Datasets: ``frames`` (N, ny, nx, detector dtype), ``unique_id`` (N,), ``timestamps`` (N,;
    the frame timestamps, seconds since the epoch) and the motor readbacks: ``positions_um``
    (N, 2; x, y) for ptychography, ``omega_deg`` (N,) for HEDM.  Attributes: ``technique``,
    ``start_json``, ``plan_name``, ``uid``, ``scan_id``, ``exit_status``, ``num_events``,
    ``complete`` (and ``reason`` from the stop document).  A ``.part`` whose writer died is
    marked "open for writing" in HDF5: open it with ``h5py.File(path, "r", swmr=True)`` (as
    ``read_scan`` does) or clear the mark with ``h5clear -s``.
    """

    reserve_bytes = 256 * 1024  # free space kept beyond the next frame; less is a full disk

    def __init__(self, data_dir: str | os.PathLike, stream: str = "primary"):
        super().__init__()
        self.data_dir = Path(data_dir).expanduser()
        self.stream = stream
        self.last_path: Path | None = None
        self.paths: list[Path] = []
        self.errors: list[str] = []
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
        if run.error is not None:
            return doc
        n_axes = POSITIONS[run.start["technique"]][1]
        position = [float(data[k]) for k in keys.axes]
        uid = int(data[keys.unique_id]) if keys.unique_id else int(doc.get("seq_num", run.n + 1))
        timestamp = float(doc.get("timestamps", {}).get(keys.image, doc["time"]))
        frame = np.asarray(frame)
        try:
            if run.file is None:
                self._open(run, frame.dtype, frame.shape)
            free = shutil.disk_usage(run.path.parent).free
            if free < frame.nbytes + self.reserve_bytes:
                self._failed(run, f"disk full: {free} bytes free in {run.path.parent}")
                return doc
            # each dataset grows by one; once that is on disk, num_events says the row is whole
            for name, value in (
                ("frames", frame),
                ("positions", position if n_axes > 1 else position[0]),
                ("unique_id", uid),
                ("timestamps", timestamp),
            ):
                run.datasets[name].resize(run.n + 1, axis=0)
                run.datasets[name][run.n] = value
            run.file.flush()
            run.file.attrs["num_events"] = run.n + 1
            run.file.flush()
            run.n += 1
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            return doc
        # after the except block, whose traceback holds h5py objects
        self._failed(run, error, broken=run.file is not None)
        return doc

    def stop(self, doc):
        run = self._runs.pop(doc["run_start"], None)
        if run is None:
            return doc
        self._descriptors = {d: s for d, s in self._descriptors.items() if s != doc["run_start"]}
        if run.error is not None:
            log.error("ScanWriter: %s keeps the %d frames written before", self._part(run), run.n)
            return doc
        try:
            if run.file is None:
                shape = run.keys.shape if run.keys else (0, 0)
                self._open(run, np.int32, shape)  # a run without events: an empty file
            self._finish(run, doc)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            return doc
        self._failed(run, error, broken=run.file is not None)
        if run.path is not None:
            log.error("ScanWriter: %s kept as it was (%d frames)", self._part(run), run.n)
        return doc

    def _part(self, run: _Run) -> Path:
        return run.path.with_name(run.path.name + PART)

    def _open(self, run: _Run, dtype, shape: tuple[int, ...]) -> None:
        start = run.start
        self.data_dir.mkdir(parents=True, exist_ok=True)
        run.path = self.data_dir / f"scan_{start.get('scan_id', 0)}_{start['uid'][:8]}.h5"
        positions_name, n_axes = POSITIONS[start["technique"]]
        f = run.file = h5py.File(self._part(run), "w", libver="latest")
        chunks = (1, *shape) if all(shape) else True
        rows = (0, n_axes) if n_axes > 1 else (0,)
        run.datasets = {
            "frames": f.create_dataset(
                "frames", (0, *shape), dtype, maxshape=(None, *shape), chunks=chunks
            ),
            "positions": f.create_dataset(positions_name, rows, float, maxshape=(None, *rows[1:])),
            "unique_id": f.create_dataset("unique_id", (0,), np.int64, maxshape=(None,)),
            "timestamps": f.create_dataset("timestamps", (0,), float, maxshape=(None,)),
        }
        f.attrs.update(
            technique=start["technique"],
            start_json=json.dumps(start, default=repr),
            plan_name=str(start.get("plan_name", "")),
            uid=start["uid"],
            scan_id=int(start.get("scan_id", 0)),
            exit_status="running",
            reason="",
            num_events=0,
            complete=False,
        )
        # from now on the file on disk is readable at every moment, and no object or
        # attribute can be added to it (existing attributes can be changed)
        f.swmr_mode = True

    def _finish(self, run: _Run, stop: dict) -> None:
        exit_status = stop.get("exit_status", "unknown")
        f = run.file
        f.attrs["exit_status"] = str(exit_status)
        f.attrs["reason"] = str(stop.get("reason", ""))
        f.attrs["complete"] = True
        f.flush()
        self._close(run)
        _fsync(self._part(run))
        os.replace(self._part(run), run.path)
        _fsync(run.path.parent)  # the rename
        self.last_path = run.path
        self.paths.append(run.path)
        log.log(
            logging.INFO if exit_status == "success" else logging.WARNING,
            "ScanWriter: wrote %s (%d frames, exit_status %s)",
            run.path,
            run.n,
            exit_status,
        )

    def _failed(self, run: _Run, error: str, broken: bool = False) -> None:
        """Stop writing this run (the scan goes on): the ``.part`` file keeps what was
        flushed, marked incomplete."""
        if run.error is None:
            run.error = error
            self.errors.append(f"{run.start['uid']}: {error}")
            log.error(
                "ScanWriter: cannot write run %s after %d frames: %s; the scan goes on",
                run.start["uid"],
                run.n,
                error,
            )
        if broken:
            # closing an HDF5 file whose write failed retries the write (and can crash the
            # library): from now on its writes go to /dev/null, the file keeps what it has
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, run.file.id.get_vfd_handle())
            finally:
                os.close(null)
        try:
            self._close(run)
        except Exception:
            log.exception("ScanWriter: closing %s", self._part(run))

    @staticmethod
    def _close(run: _Run) -> None:
        datasets, run.datasets = run.datasets, {}
        for dataset in datasets.values():
            dataset.id.close()
        if run.file is not None:
            file, run.file = run.file, None
            file.close()


class RetrainTrigger(CallbackBase):
    """Request retraining from a RunEngine subscription: ``RE.subscribe(RetrainTrigger("SIM:"))``.

    Counts runs of a known technique (ptychography, hedm) and their events (frames); when a
    run stops successfully it requests retraining if ``every_n_runs`` runs have finished, or
    — with ``every_n_frames`` set — once that many new frames have been collected.  The
    request writes its reason to ``$(P)ml:Request`` over pvAccess, which the service records
    as the trigger; it coalesces requests that arrive while it trains into one follow-up.

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
        Called with the reason instead of the PV write (e.g. ``RetrainService.request``).
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
            self.fire(doc["run_start"])
        return doc

    def fire(self, run_uid: str = "") -> None:
        self.requests += 1
        reason = f"bluesky RetrainTrigger after run {run_uid[:8]} (request {self.requests})"
        if self._request is not None:
            self._request(reason)
            return
        from p4p.client.thread import Context

        if self._ctx is None:
            self._ctx = Context("pva", nt=False)
        try:  # the reason is recorded as the trigger (ml:Trigger, the model's metadata)
            self._ctx.put(f"{self.prefix}ml:Request", reason, timeout=5)
            log.info("RetrainTrigger: requested retraining (%sml:Request)", self.prefix)
        except Exception as exc:  # never break the scan over this
            log.error("RetrainTrigger: cannot write %sml:Request: %s", self.prefix, exc)
