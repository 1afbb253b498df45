"""The on-disk scan formats read by remote/: ScanWriter's scan files and RunIndex's run
entries.

**Scan files** (``scan_*.h5``, HDF5), written by the Bluesky ``ScanWriter`` from the event
documents.  Datasets: ``frames`` (N, ny, nx), ``unique_id`` (N,), ``timestamps`` (N,) and
the positions of the technique: ``positions_um`` (N, 2) as (x, y) for ptychography,
``omega_deg`` (N,) for HEDM; attributes ``technique``, ``start_json``, ``plan_name``,
``uid``, ``scan_id``, ``exit_status``, ``num_events``, ``complete``.  A scan is written as
``scan_*.h5.part`` while it runs (HDF5 in SWMR mode, flushed per event) and renamed to
``scan_*.h5`` when its stop document is written; a ``.part`` left by a process that died is
readable, with ``complete`` false and the ``num_events`` written.  Files written before
``complete`` existed count as complete.

**Run entries** (``run_<scan_id:05d>_<uid8>.json``), written by the Bluesky ``RunIndex`` at
a run's stop document: references, never frames, to what the detector wrote::

    {"technique": "ptychography" | "hedm", "start": {...}, "stop": {...},
     "resources": [{"uid", "spec", "root", "resource_path", "resource_kwargs",
                    "frames": the number of frames the run's datums refer to}, ...]}

Each resource is an areaDetector HDF5 file (spec ``AD_HDF5``, or a stream resource of
mimetype ``application/x-hdf5``) at ``root/resource_path`` (a relative path is taken from
the entry's directory); its first ``frames`` rows are the run's frames, with positions,
uniqueIds and timestamps from its NDAttributes (:mod:`edgeloop.adfile`).  The file may
still be written (SWMR) when the entry appears: a reader takes only the rows every dataset
holds, and a run whose files hold fewer than ``frames`` rows is incomplete.

:func:`read_scan` reads either into the same dict; :func:`write_scan` writes a whole scan
file at once (what a test, a simulation or a conversion holds already).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from edgeloop import adfile, tiled_runs
from edgeloop.config import SCAN_POSITIONS

SCAN_DATASETS = ("frames", "unique_id", "timestamps")
SCAN_ATTRS = ("start_json", "plan_name", "uid", "scan_id", "exit_status", "num_events")
POSITIONS = SCAN_POSITIONS  # technique -> (positions dataset, number of motor axes)
PART = ".part"  # suffix of a scan file while it is written
SCAN_GLOB, RUN_GLOB = "scan_*.h5", "run_*.json"
RUN_SUFFIX = ".json"
RUN_KEYS = ("technique", "start", "stop", "resources")
# resource specs (stream resources: mimetypes) whose files have areaDetector's HDF5 layout
AD_HDF5_SPECS = ("AD_HDF5", "AD_HDF5_SWMR", "application/x-hdf5")


def _open(path: Path) -> h5py.File:
    # swmr when a writer holds it: also a file whose SWMR writer died (its flag still set)
    return adfile.open_hdf5(path)


def run_entry_name(start: dict) -> str:
    """The file name of a run's entry: ``run_<scan_id:05d>_<uid[:8]>.json``."""
    return f"run_{int(start.get('scan_id') or 0):05d}_{start['uid'][:8]}{RUN_SUFFIX}"


def read_scan(path: str | os.PathLike) -> dict:
    """Load a scan file written by :class:`ScanWriter`, or a run entry written by
    :class:`RunIndex` with its frames from the detector's files.

    Parameters
    ----------
    path : str or os.PathLike
        The ``scan_*.h5`` file, the ``run_*.json`` entry, or a run stored in Tiled (its
        URL: :mod:`edgeloop.tiled_runs`).

    Returns
    -------
    dict
        ``frames`` (N, ny, nx), ``unique_id`` (N,), ``timestamps`` (N,; unix seconds) and
        ``positions_um`` (N, 2) or ``omega_deg`` (N,) as numpy arrays; ``technique``,
        ``start`` (the start document, dict), ``plan_name``, ``uid``, ``scan_id``,
        ``exit_status``, ``num_events``, ``complete``, ``reason`` and ``path``.  Of an
        incomplete scan file, the first ``num_events`` rows (those written whole).  Of a run
        entry, ``num_events`` is the run's number of events (the stop document's) and the
        frames are each file's first rows that every dataset holds, at most the frames the
        run refers to; ``complete`` says whether the files held all of those.

    Raises
    ------
    FileNotFoundError
        If the file, or a file a run entry refers to, does not exist.
    ValueError
        If the file is not HDF5 (or not a run entry) or lacks the scan datasets or
        attributes; if a file a run entry refers to is not readable or lacks a dataset of
        areaDetector's layout.
    """
    if tiled_runs.is_ref(path):
        return tiled_runs.read_run(str(path))
    if Path(path).suffix == RUN_SUFFIX:
        return _read_run(Path(path))
    return _read_scan_file(Path(path))


def _read_scan_file(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no scan file {path}")
    try:
        f = _open(path)
    except OSError as exc:
        raise ValueError(f"{path} is not a readable HDF5 file: {exc}") from exc
    with f:
        technique = str(f.attrs.get("technique", "ptychography"))
        if technique not in POSITIONS:
            raise ValueError(
                f"{path}: unknown technique {technique!r}; known: {sorted(POSITIONS)}"
            )
        names = (*SCAN_DATASETS, POSITIONS[technique][0])
        missing = [name for name in names if not isinstance(f.get(name), h5py.Dataset)]
        missing += [f"@{name}" for name in SCAN_ATTRS if name not in f.attrs]
        if missing:
            raise ValueError(f"{path} is not a ScanWriter scan file; missing {missing}")
        attrs = {name: f.attrs[name] for name in SCAN_ATTRS}
        complete = bool(f.attrs.get("complete", True))
        rows = slice(None) if complete else slice(int(attrs["num_events"]))
        out = {name: f[name][rows] for name in names}
        reason = f.attrs.get("reason", "")
    n = len(out["frames"])
    if out["frames"].ndim != 3 or any(len(out[k]) != n for k in names):
        raise ValueError(
            f"{path}: inconsistent dataset lengths/shapes { {k: out[k].shape for k in names} }"
        )
    out.update(
        technique=technique,
        start=json.loads(attrs["start_json"]),
        plan_name=str(attrs["plan_name"]),
        uid=str(attrs["uid"]),
        scan_id=int(attrs["scan_id"]),
        exit_status=str(attrs["exit_status"]),
        num_events=int(attrs["num_events"]),
        complete=complete,
        reason=str(reason),
        path=path,
    )
    return out


def read_run_entry(path: str | os.PathLike) -> dict:
    """The JSON of a run entry, checked for what a reader needs.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If it is not a run entry, or refers to files of a layout not readable here."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no run entry {path}")
    try:
        entry = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a run entry (JSON): {exc}") from exc
    missing = [k for k in RUN_KEYS if not isinstance(entry, dict) or k not in entry]
    if missing:
        raise ValueError(f"{path} is not a RunIndex run entry; missing {missing}")
    if entry["technique"] not in POSITIONS:
        raise ValueError(
            f"{path}: unknown technique {entry['technique']!r}; known: {sorted(POSITIONS)}"
        )
    if not entry["resources"]:
        raise ValueError(f"{path}: the run refers to no detector files")
    for resource in entry["resources"]:
        spec = resource.get("spec")
        if spec not in AD_HDF5_SPECS:
            raise ValueError(
                f"{path}: resource {resource.get('uid')} has spec {spec!r}; "
                f"readable: {list(AD_HDF5_SPECS)}"
            )
        frames = resource.get("frames")
        if not resource.get("resource_path") or not isinstance(frames, int) or frames < 0:
            raise ValueError(
                f"{path}: resource {resource.get('uid')} lacks its resource_path or "
                f"number of frames: {resource}"
            )
    return entry


def resource_file(path: Path, resource: dict) -> Path:
    """Where a run entry's resource is: ``root/resource_path``, a relative one from the
    entry's directory."""
    return Path(path).parent / resource.get("root", "") / resource["resource_path"]


def _open_resource(path: Path, resource: dict) -> h5py.File:
    """The file of a run entry's resource (``root/resource_path``, a relative one from the
    entry's directory)."""
    file = resource_file(path, resource)
    return adfile.open_file(file, f"resource {resource.get('uid')} of {path}")


def _positions(entry: dict) -> list[str] | None:
    """The NDAttributes the run's positions are in, as RunIndex recorded them (entries
    written before it did: areaDetector's defaults)."""
    return entry.get("position_attributes") or None


def _resource_dataset(resource: dict) -> str:
    return (resource.get("resource_kwargs") or {}).get("dataset", adfile.DATA)


def _read_run(path: Path) -> dict:
    entry = read_run_entry(path)
    technique = entry["technique"]
    parts, short = [], []
    for resource in entry["resources"]:
        expected = int(resource["frames"])
        with _open_resource(path, resource) as f:
            rows = adfile.read_rows(
                f, technique, expected, _resource_dataset(resource), _positions(entry)
            )
            if len(rows["frames"]) < expected:
                short.append(f"{f.filename} holds {len(rows['frames'])} of {expected} frames")
        parts.append(rows)
    shapes = {part["frames"].shape[1:] for part in parts}
    if len(shapes) > 1:
        raise ValueError(f"{path}: the run's files hold frames of different shapes {shapes}")
    out = {
        name: np.concatenate([part[key] for part in parts])
        for name, key in (
            ("frames", "frames"),
            ("unique_id", "unique_id"),
            ("timestamps", "timestamps"),
            (POSITIONS[technique][0], "positions"),
        )
    }
    start, stop = entry["start"], entry["stop"]
    out.update(
        technique=technique,
        start=start,
        plan_name=str(start.get("plan_name", "")),
        uid=str(start.get("uid", "")),
        scan_id=int(start.get("scan_id") or 0),
        exit_status=str(stop.get("exit_status", "unknown")),
        num_events=int(sum((stop.get("num_events") or {}).values())),
        complete=not short,
        reason="; ".join(r for r in (str(stop.get("reason") or ""), *short) if r),
        path=path,
    )
    return out


def write_scan(
    path: str | os.PathLike,
    technique: str,
    frames: np.ndarray,
    positions: np.ndarray | None = None,
    *,
    complete: bool | None = True,
    **attrs,
) -> Path:
    """A scan file of ``frames`` at ``positions`` (the technique's: (N, 2) um, or (N,)
    degrees; zeros when None), uniqueIds from 1 and timestamps 0, 1, ...; ``complete`` None
    leaves the attribute out (a file of before it); ``attrs`` override the defaults."""
    frames = np.asarray(frames)
    n = len(frames)
    name, width = POSITIONS[technique]
    if positions is None:
        positions = np.zeros((n, 2) if width == 2 else n)
    meta = {"technique": technique, "start_json": "{}", "plan_name": "write_scan", "uid": "u"}
    meta.update(scan_id=1, exit_status="success", num_events=n)
    if complete is not None:
        meta["complete"] = complete
    meta.update(attrs)
    with h5py.File(path, "w") as f:
        f["frames"] = frames
        f[name] = np.asarray(positions, np.float64)
        f["unique_id"] = np.arange(1, n + 1)
        f["timestamps"] = np.arange(n, dtype=float)
        f.attrs.update(meta)
    return Path(path)


def list_scans(data_dir: str | Path) -> list[Path]:
    """Scan files and run entries in a directory, oldest first."""
    root = Path(data_dir)
    if not root.is_dir():
        return []
    found = []
    for path in (*root.glob(SCAN_GLOB), *root.glob(RUN_GLOB)):
        try:
            found.append((path.stat().st_mtime, path))
        except FileNotFoundError:  # removed meanwhile
            pass
    return [path for _, path in sorted(found)]


def scan_summary(path: str | Path) -> tuple[str, int]:
    """(technique, number of frames) of a scan file or run entry without reading the frames.

    Raises
    ------
    OSError
        If the file, or a file a run entry refers to, is missing or not readable HDF5 (e.g.
        truncated).
    ValueError
        If it is incomplete or its datasets disagree in length (one scan, one answer); if a
        run entry is not one, or a file it refers to lacks a dataset of areaDetector's
        layout or holds fewer frames than the run refers to."""
    path = Path(path)
    if path.suffix == RUN_SUFFIX:
        return _run_summary(path)
    with _open(path) as f:
        technique = str(f.attrs.get("technique", "ptychography"))
        if technique not in POSITIONS:
            raise ValueError(f"unknown technique {technique!r}")
        if not f.attrs.get("complete", True):
            raise ValueError(f"incomplete ({f.attrs.get('error', 'its writer stopped')})")
        names = (*SCAN_DATASETS, POSITIONS[technique][0])
        missing = [name for name in names if not isinstance(f.get(name), h5py.Dataset)]
        if missing:
            raise ValueError(f"no {missing}")
        lengths = {name: f[name].shape[0] if f[name].shape else 0 for name in names}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"datasets of different lengths {lengths}")
        return technique, lengths["frames"]


def _run_summary(path: Path) -> tuple[str, int]:
    entry = read_run_entry(path)
    technique, total, shapes = entry["technique"], 0, set()
    for resource in entry["resources"]:
        expected = int(resource["frames"])
        with _open_resource(path, resource) as f:
            n, shape = adfile.whole_rows(
                f, technique, _resource_dataset(resource), _positions(entry)
            )
            if n < expected:
                raise ValueError(
                    f"incomplete: {f.filename} holds {n} of the {expected} frames of the run "
                    "(still being written, or its writer stopped)"
                )
        total += expected
        shapes.add(shape)
    if len(shapes) > 1:
        raise ValueError(f"the run's files hold frames of different shapes {shapes}")
    return technique, total


__all__ = [
    "AD_HDF5_SPECS",
    "PART",
    "RUN_GLOB",
    "SCAN_GLOB",
    "POSITIONS",
    "SCAN_ATTRS",
    "SCAN_DATASETS",
    "read_run_entry",
    "read_scan",
    "resource_file",
    "run_entry_name",
    "list_scans",
    "scan_summary",
]


def run_uid(ref: str | Path) -> str | None:
    """The Bluesky run uid of a scan (a Tiled run's URL, a run entry or a scan file) from
    its metadata alone; None if it cannot be read."""
    if tiled_runs.is_ref(ref):
        return str(ref).rstrip("/").rsplit("/", 1)[-1]
    path = Path(ref)
    try:
        if path.suffix == RUN_SUFFIX:
            return str(json.loads(path.read_text())["start"]["uid"])
        with _open(path) as f:
            return str(f.attrs["uid"])
    except (OSError, KeyError, ValueError, TypeError):
        return None
