"""The on-disk scan format (HDF5) written by the Bluesky ScanWriter and read by remote/.

Datasets: ``frames`` (N, ny, nx), ``positions_um`` (N, 2) as (x, y), ``unique_id`` (N,),
``timestamps`` (N,); attributes ``start_json``, ``plan_name``, ``uid``, ``scan_id``,
``exit_status``, ``num_events``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py

SCAN_DATASETS = ("frames", "positions_um", "unique_id", "timestamps")
SCAN_ATTRS = ("start_json", "plan_name", "uid", "scan_id", "exit_status", "num_events")


def read_scan(path: str | os.PathLike) -> dict:
    """Load a scan file written by :class:`ScanWriter`.

    Parameters
    ----------
    path : str or os.PathLike
        The ``scan_*.h5`` file.

    Returns
    -------
    dict
        ``frames`` (N, ny, nx), ``positions_um`` (N, 2), ``unique_id`` (N,), ``timestamps``
        (N,) as numpy arrays; ``start`` (the start document, dict), ``plan_name``, ``uid``,
        ``scan_id``, ``exit_status``, ``num_events``, ``reason`` and ``path``.

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
        missing = [name for name in SCAN_DATASETS if not isinstance(f.get(name), h5py.Dataset)]
        missing += [f"@{name}" for name in SCAN_ATTRS if name not in f.attrs]
        if missing:
            raise ValueError(f"{path} is not a ScanWriter scan file; missing {missing}")
        out = {name: f[name][()] for name in SCAN_DATASETS}
        attrs = {name: f.attrs[name] for name in SCAN_ATTRS}
        reason = f.attrs.get("reason", "")
    n = len(out["frames"])
    if out["frames"].ndim != 3 or any(len(out[k]) != n for k in SCAN_DATASETS):
        raise ValueError(f"{path}: inconsistent dataset lengths/shapes "
                         f"{ {k: out[k].shape for k in SCAN_DATASETS} }")
    out.update(start=json.loads(attrs["start_json"]), plan_name=str(attrs["plan_name"]),
               uid=str(attrs["uid"]), scan_id=int(attrs["scan_id"]),
               exit_status=str(attrs["exit_status"]), num_events=int(attrs["num_events"]),
               reason=str(reason), path=path)
    return out


def list_scans(data_dir: str | Path) -> list[Path]:
    """Scan files in a directory, oldest first."""
    root = Path(data_dir)
    if not root.is_dir():
        return []
    return sorted(root.glob("scan_*.h5"), key=lambda p: p.stat().st_mtime)


def count_frames(path: str | Path) -> int:
    with h5py.File(path, "r") as f:
        return int(f["frames"].shape[0]) if "frames" in f else 0


__all__ = ["SCAN_ATTRS", "SCAN_DATASETS", "read_scan", "list_scans", "count_frames"]
