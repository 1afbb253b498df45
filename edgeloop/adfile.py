"""Reading the HDF5 files an areaDetector file plugin (NDFileHDF5) writes, in its default
layout::

    /entry/data/data                               (N, ny, nx) the frames
    /entry/instrument/NDAttributes/NDArrayUniqueId (N,) uniqueIds
    /entry/instrument/NDAttributes/NDArrayTimeStamp (N,) seconds since 1990-01-01 (EPICS)
    /entry/instrument/NDAttributes/<name>          (N,) one series per NDAttribute

The stage positions come from the NDAttributes the beamline attaches to each frame:
``SampleX``, ``SampleY`` (micrometres) for ptychography, ``SampleRot`` (degrees) for HEDM,
unless the beamline's attributes file names them otherwise (``positions`` in the readers:
what a run entry recorded, from the configuration's ``[positions]``).

A file may still be written (SWMR) while it is read (:func:`open_hdf5`): the writer appends a
frame and then one row to each attribute series, and a reader may see the frames one row
ahead of a series (or a series' last row not yet filled, its uniqueId the fill value 0).
:func:`read_rows` and :func:`whole_rows` therefore count only the rows that every dataset
holds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

EPICS_EPOCH = 631152000  # 1990-01-01 in unix seconds
DATA = "/entry/data/data"
ATTRIBUTES = "/entry/instrument/NDAttributes"
UNIQUE_ID = f"{ATTRIBUTES}/NDArrayUniqueId"
TIMESTAMP = f"{ATTRIBUTES}/NDArrayTimeStamp"
# technique -> the NDAttributes holding the positions (scanfile.POSITIONS gives their order)
POSITION_ATTRIBUTES = {"ptychography": ("SampleX", "SampleY"), "hedm": ("SampleRot",)}


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# a closing writer may leave a moment where the file is shorter than its superblock says
CLOSE_RETRIES, CLOSE_WAIT_S = 3, 0.05


def _writer_holds(path: Path) -> bool:
    """Whether the file's superblock (version >= 2, at the start of the file) carries the
    consistency flags a writer sets while it has the file open (a SWMR writer: the simulated
    IOC, areaDetector, ScanWriter; or one that died)."""
    with open(path, "rb") as f:
        head = f.read(12)
    return len(head) == 12 and head[:8] == HDF5_SIGNATURE and head[8] >= 2 and head[11] != 0


def open_hdf5(path: str | Path) -> h5py.File:
    """Open an HDF5 file for reading: as it is when its writer has closed it, with
    ``swmr=True`` when a writer holds it open (or died holding it).

    A file no writer holds is never opened in SWMR mode: a SWMR reader does not check the
    file's length and retries (for minutes) every read of a truncated file's missing end.

    Raises
    ------
    OSError
        If the file is missing, truncated or not HDF5.
    """
    path = Path(path)
    for attempt in range(CLOSE_RETRIES):
        try:
            return h5py.File(path, "r")
        except OSError as exc:
            error = exc
        if _writer_holds(path):
            try:
                return h5py.File(path, "r", swmr=True)
            except (OSError, RuntimeError) as exc:  # HDF5's own for a damaged superblock
                raise OSError(f"{path}: not readable HDF5: {exc}") from exc
        if "truncated" not in str(error) or attempt == CLOSE_RETRIES - 1:
            break
        time.sleep(CLOSE_WAIT_S)
    raise error


def open_file(path: str | Path, what: str = "") -> h5py.File:
    """Open an areaDetector file for reading (:func:`open_hdf5`), also while its SWMR writer
    has it open.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If it is not readable HDF5 (e.g. truncated).
    """
    path = Path(path)
    where = f" ({what})" if what else ""
    if not path.is_file():
        raise FileNotFoundError(f"no areaDetector file {path}{where}")
    try:
        return open_hdf5(path)
    except OSError as exc:
        raise ValueError(f"{path}{where} is not a readable HDF5 file: {exc}") from exc


def _datasets(
    f: h5py.File, technique: str, data: str, positions: Sequence[str] | None = None
) -> dict[str, h5py.Dataset]:
    names = {
        "frames": data,
        "unique_id": UNIQUE_ID,
        "timestamps": TIMESTAMP,
        **{
            f"position {i}": f"{ATTRIBUTES}/{n}"
            for i, n in enumerate(_names(technique, positions))
        },
    }
    found = {key: f.get(name) for key, name in names.items()}
    missing = [names[key] for key, ds in found.items() if not isinstance(ds, h5py.Dataset)]
    if missing:
        raise ValueError(
            f"{f.filename} is not an areaDetector HDF5 file of a {technique} scan; "
            f"missing {missing}"
        )
    if found["frames"].ndim != 3:
        raise ValueError(
            f"{f.filename}: {data} has shape {found['frames'].shape}, not (N, ny, nx)"
        )
    return found


def _whole(datasets: dict[str, h5py.Dataset]) -> int:
    n = min(ds.shape[0] for ds in datasets.values())
    unique_id = datasets["unique_id"]
    while n and unique_id[n - 1] == 0:  # a row the writer has made room for, not yet filled
        n -= 1
    return n


def _names(technique: str, positions: Sequence[str] | None) -> tuple[str, ...]:
    """The NDAttributes holding a technique's positions: ``positions`` (what a run entry
    recorded), else areaDetector's names in the simulated beamline."""
    names = tuple(positions) if positions else POSITION_ATTRIBUTES[technique]
    if len(names) != len(POSITION_ATTRIBUTES[technique]):
        raise ValueError(f"a {technique} scan has {len(POSITION_ATTRIBUTES[technique])} "
                         f"position attributes, not {list(names)}")  # fmt: skip
    return names


def whole_rows(
    f: h5py.File, technique: str, data: str = DATA, positions: Sequence[str] | None = None
) -> tuple[int, tuple[int, ...]]:
    """How many rows every dataset of the file holds now (the frames written whole), and the
    frame shape (ny, nx), without reading the frames; ``positions``: the NDAttributes that
    hold the positions (default :data:`POSITION_ATTRIBUTES`).

    Raises
    ------
    ValueError
        If a dataset of the layout is missing."""
    datasets = _datasets(f, technique, data, positions)
    return _whole(datasets), datasets["frames"].shape[1:]


def read_rows(
    f: h5py.File,
    technique: str,
    limit: int,
    data: str = DATA,
    positions: Sequence[str] | None = None,
) -> dict:
    """The first rows (at most ``limit``) that every dataset holds: ``frames`` (n, ny, nx),
    ``unique_id`` (n,), ``timestamps`` (n,; unix seconds) and ``positions`` — (n, 2) as
    (x, y) micrometres for ptychography, (n,) degrees for HEDM.

    Raises
    ------
    ValueError
        If a dataset of the layout is missing."""
    datasets = _datasets(f, technique, data, positions)
    n = min(limit, _whole(datasets))
    axes = [
        ds[:n].astype(np.float64) for key, ds in datasets.items() if key.startswith("position")
    ]
    return {
        "frames": datasets["frames"][:n],
        "unique_id": datasets["unique_id"][:n].astype(np.int64),
        "timestamps": datasets["timestamps"][:n].astype(np.float64) + EPICS_EPOCH,
        "positions": np.column_stack(axes) if len(axes) > 1 else axes[0],
    }


__all__ = [
    "ATTRIBUTES",
    "DATA",
    "EPICS_EPOCH",
    "POSITION_ATTRIBUTES",
    "TIMESTAMP",
    "UNIQUE_ID",
    "open_file",
    "open_hdf5",
    "read_rows",
    "whole_rows",
]
