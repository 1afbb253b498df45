"""The on-disk scan format (HDF5) written by the Bluesky ScanWriter and read by remote/.

Datasets: ``frames`` (N, ny, nx), ``unique_id`` (N,), ``timestamps`` (N,) and the positions
of the technique: ``positions_um`` (N, 2) as (x, y) for ptychography, ``omega_deg`` (N,) for
HEDM; attributes ``technique``, ``start_json``, ``plan_name``, ``uid``, ``scan_id``,
``exit_status``, ``num_events``, ``complete``.

A scan is written as ``scan_*.h5.part`` while it runs (HDF5 in SWMR mode, flushed per event)
and renamed to ``scan_*.h5`` when its stop document is written; a ``.part`` left by a
process that died is readable, with ``complete`` false and the ``num_events`` written.
Files written before ``complete`` existed count as complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py

SCAN_DATASETS = ("frames", "unique_id", "timestamps")
SCAN_ATTRS = ("start_json", "plan_name", "uid", "scan_id", "exit_status", "num_events")
# technique -> (positions dataset, number of motor axes)
POSITIONS = {"ptychography": ("positions_um", 2), "hedm": ("omega_deg", 1)}
PART = ".part"  # suffix of a scan file while it is written


def _open(path: Path) -> h5py.File:
    # swmr: also a file whose SWMR writer died (its "open for writing" flag still set)
    return h5py.File(path, "r", swmr=True)


def read_scan(path: str | os.PathLike) -> dict:
    """Load a scan file written by :class:`ScanWriter`.

    Parameters
    ----------
    path : str or os.PathLike
        The ``scan_*.h5`` file.

    Returns
    -------
    dict
        ``frames`` (N, ny, nx), ``unique_id`` (N,), ``timestamps`` (N,) and
        ``positions_um`` (N, 2) or ``omega_deg`` (N,) as numpy arrays; ``technique``,
        ``start`` (the start document, dict), ``plan_name``, ``uid``, ``scan_id``,
        ``exit_status``, ``num_events``, ``complete``, ``reason`` and ``path``.  Of an
        incomplete file, the first ``num_events`` rows (those written whole).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is not HDF5 or lacks the scan datasets or attributes.
    """
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


def list_scans(data_dir: str | Path) -> list[Path]:
    """Scan files in a directory, oldest first."""
    root = Path(data_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.glob("scan_*.h5"):
        try:
            found.append((path.stat().st_mtime, path))
        except FileNotFoundError:  # removed meanwhile
            pass
    return [path for _, path in sorted(found)]


def scan_summary(path: str | Path) -> tuple[str, int]:
    """(technique, number of frames) of a scan file without reading the frames.

    Raises
    ------
    OSError
        If the file is not readable HDF5 (e.g. truncated).
    ValueError
        If it is incomplete or its datasets disagree in length (one scan, one answer)."""
    with _open(Path(path)) as f:
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


__all__ = [
    "PART",
    "POSITIONS",
    "SCAN_ATTRS",
    "SCAN_DATASETS",
    "read_scan",
    "list_scans",
    "scan_summary",
]
