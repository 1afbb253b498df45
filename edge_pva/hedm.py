"""HEDM at the edge: Bragg-peak candidates of a frame -> 11x11 patches -> BraggNN in one batch
-> sub-pixel centres in detector pixels, published as one NTTable per frame."""

from __future__ import annotations

import time

import numpy as np
import torch
from p4p import Value
from p4p.nt import NTTable

from edgeloop.edge_pva.peaks import crop_patches, find_peaks
from edgeloop.models import braggnn_preprocess

PEAK_COLUMNS = [("uniqueId", "i"), ("peak", "i"), ("x", "d"), ("y", "d"), ("intensity", "d"),
                ("max", "d"), ("saturated", "?"), ("border", "?")]
PEAK_TABLE = NTTable(PEAK_COLUMNS)


def locate_peaks(frame: np.ndarray, model: torch.nn.Module, patch: int = 11,
                 **finder) -> dict[str, np.ndarray]:
    """Peaks of one frame: x (column), y (row) in detector pixels, intensity, max and flags.

    ``finder`` goes to :func:`edgeloop.edge_pva.peaks.find_peaks` (threshold, sigma, ...).
    """
    peaks = find_peaks(frame, **finder)
    patches, tops = crop_patches(frame, peaks, patch)
    if len(peaks):
        with torch.inference_mode():
            (centre,) = model(torch.from_numpy(braggnn_preprocess(patches, patch)))
        centre = centre.numpy().astype(np.float64) * patch  # (x, y) in patch pixels
    else:
        centre = np.zeros((0, 2))
    return {"x": tops[:, 1] + centre[:, 0], "y": tops[:, 0] + centre[:, 1],
            "intensity": np.asarray(peaks.intensity, np.float64),
            "max": np.asarray(peaks.maxima, np.float64),
            "saturated": np.asarray(peaks.saturated, bool),
            "border": np.asarray(peaks.border, bool)}


def peak_table(unique_id: int, peaks: dict[str, np.ndarray],
               timestamp: float | None = None) -> Value:
    """The NTTable of one frame's peaks (zero rows when the frame has none)."""
    n = len(peaks["x"])
    t = time.time() if timestamp is None else timestamp
    columns = dict(peaks, uniqueId=np.full(n, unique_id, np.int32),
                   peak=np.arange(n, dtype=np.int32))
    sec = int(t)
    return Value(PEAK_TABLE.type, {
        "labels": [name for name, _ in PEAK_COLUMNS],
        "value": {name: columns[name] for name, _ in PEAK_COLUMNS},
        "timeStamp": {"secondsPastEpoch": sec, "nanoseconds": int((t - sec) * 1e9)},
    })
