"""The on-disk scan format (HDF5) written by the Bluesky ScanWriter and read by remote/.

Datasets: ``frames`` (N, ny, nx), ``unique_id`` (N,), ``timestamps`` (N,) and the positions
of the technique: ``positions_um`` (N, 2) as (x, y) for ptychography, ``omega_deg`` (N,) for
HEDM; attributes ``technique``, ``start_json``, ``plan_name``, ``uid``, ``scan_id``,
``exit_status``, ``num_events``.
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
        ``exit_status``, ``num_events``, ``reason`` and ``path``.

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
        f = h5py.File(path, "r")
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
        out = {name: f[name][()] for name in names}
        attrs = {name: f.attrs[name] for name in SCAN_ATTRS}
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
        reason=str(reason),
        path=path,
    )
    return out


def list_scans(data_dir: str | Path) -> list[Path]:
    """Scan files in a directory, oldest first."""
    root = Path(data_dir)
    if not root.is_dir():
        return []
    return sorted(root.glob("scan_*.h5"), key=lambda p: p.stat().st_mtime)


def scan_summary(path: str | Path) -> tuple[str, int]:
    """(technique, number of frames) of a scan file without reading the frames."""
    with h5py.File(path, "r") as f:
        technique = str(f.attrs.get("technique", "ptychography"))
        return technique, int(f["frames"].shape[0]) if "frames" in f else 0


__all__ = ["POSITIONS", "SCAN_ATTRS", "SCAN_DATASETS", "read_scan", "list_scans", "scan_summary"]
