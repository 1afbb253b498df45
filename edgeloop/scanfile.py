"""The on-disk scan format (HDF5) written by the Bluesky ScanWriter and read by remote/.

Datasets: ``frames`` (N, ny, nx), ``positions_um`` (N, 2) as (x, y), ``unique_id`` (N,),
``timestamps`` (N,); attributes ``start_json``, ``plan_name``, ``uid``, ``scan_id``,
``exit_status``, ``num_events``.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py

REQUIRED = ("frames", "positions_um", "unique_id")


def read_scan(path: str | Path) -> dict:
    """Arrays and metadata of one scan file; ValueError names what is missing or wrong."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 scan file ({exc})") from exc
    with f:
        missing = [k for k in REQUIRED if k not in f]
        if missing:
            raise ValueError(f"{path}: missing datasets {missing}")
        out = {k: f[k][()] for k in f.keys()}
        out.update({k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()})
    n = len(out["frames"])
    if out["frames"].ndim != 3 or out["positions_um"].shape != (n, 2):
        raise ValueError(f"{path}: frames {out['frames'].shape} and positions "
                         f"{out['positions_um'].shape} do not match")
    out["start"] = json.loads(out.get("start_json", "{}") or "{}")
    out["path"] = str(path)
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


__all__ = ["read_scan", "list_scans", "count_frames", "REQUIRED"]
