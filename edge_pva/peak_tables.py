"""HEDM at the edge: Bragg-peak candidates of a frame -> 11x11 patches -> BraggNN in one batch
-> sub-pixel centres in detector pixels, published as one NTTable per frame."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from p4p import Value
from p4p.nt import NTTable

from edgeloop.edge_pva.label_free import centroid_distance
from edgeloop.peaks import peak_patches

PEAK_COLUMNS = [
    ("uniqueId", "i"),
    ("peak", "i"),
    ("x", "d"),
    ("y", "d"),
    ("intensity", "d"),
    ("max", "d"),
    ("saturated", "?"),
    ("border", "?"),
]
PEAK_TABLE = NTTable(PEAK_COLUMNS)
NO_PEAKS = {
    "x": np.zeros(0),
    "y": np.zeros(0),
    "intensity": np.zeros(0),
    "max": np.zeros(0),
    "saturated": np.zeros(0, bool),
    "border": np.zeros(0, bool),
    "offset": np.zeros(0),
}


def locate_peaks(
    frame: np.ndarray, infer: Callable, patch: int = 11, **finder
) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Peaks of one frame: x (column), y (row) in detector pixels, intensity, max and flags,
    and ``offset``, each centre's distance (px) from its patch's intensity centroid (the
    label-free quality, :func:`~edgeloop.edge_pva.label_free.centroid_distance`; not a table
    column); the patches the network saw; and how many maxima were left out above
    ``max_peaks``.

    ``infer(patches)`` returns ``(centres,)``, (n, 2) as (x, y) in patch widths (a
    :class:`~edgeloop.edge_pva.inference.ServedModel` of kind braggnn).  ``finder`` goes to
    :func:`edgeloop.peaks.find_peaks` (threshold, sigma, ...).
    """
    peaks, patches, tops = peak_patches(frame, patch, **finder)
    if len(peaks):
        (centre,) = infer(patches)
        centre = np.asarray(centre, np.float64) * patch  # (x, y) in patch pixels
    else:
        centre = np.zeros((0, 2))
    return (
        {
            "x": tops[:, 1] + centre[:, 0],
            "y": tops[:, 0] + centre[:, 1],
            "intensity": np.asarray(peaks.intensity, np.float64),
            "max": np.asarray(peaks.maxima, np.float64),
            "saturated": np.asarray(peaks.saturated, bool),
            "border": np.asarray(peaks.border, bool),
            "offset": centroid_distance(patches, centre),
        },
        patches,
        peaks.truncated,
    )


def peak_table(
    unique_id: int,
    peaks: dict[str, np.ndarray],
    timestamp: float | None = None,
    warning: str = "",
) -> Value:
    """The NTTable of one frame's peaks (zero rows when the frame has none).

    The frame's uniqueId is in every row and also in ``timeStamp.userTag``, so a frame
    without peaks is still identified; the time stamp is the frame's.  A ``warning`` (e.g.
    peaks left out) flags the table: alarm MINOR with that message.
    """
    n = len(peaks["x"])
    t = time.time() if timestamp is None else timestamp
    columns = dict(
        peaks, uniqueId=np.full(n, unique_id, np.int32), peak=np.arange(n, dtype=np.int32)
    )
    sec = int(t)
    return Value(
        PEAK_TABLE.type,
        {
            "labels": [name for name, _ in PEAK_COLUMNS],
            "value": {name: columns[name] for name, _ in PEAK_COLUMNS},
            "timeStamp": {
                "secondsPastEpoch": sec,
                "nanoseconds": int((t - sec) * 1e9),
                "userTag": int(unique_id),
            },
            "alarm": {"severity": 1 if warning else 0, "message": warning},
        },
    )
