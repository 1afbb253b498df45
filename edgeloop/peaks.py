"""Bragg-peak candidates in a detector frame and the fixed-size patches BraggNN reads (core:
the edge server and the pseudo-Voigt labelling find peaks the same way).

Behaviour at the edges of the problem, by design:
- a frame with no pixel above threshold gives no peaks (an empty table, not an error);
- overlapping peaks: every local maximum at least ``min_separation`` pixels from a brighter
  one is its own candidate, so a merged blob of two peaks gives two patches;
- a peak whose patch would cross the frame border is cropped with edge padding and flagged
  ``border`` (its centre is still reported; a consumer may drop it);
- a peak touching the detector's saturation value is flagged ``saturated`` (its shape is
  clipped, so its centre is less certain);
- a frame with more than ``max_peaks`` maxima (a flood of light, a noisy frame) keeps the
  brightest ``max_peaks`` and says how many it left out (``truncated``), so no frame costs
  more than a bounded time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class Candidates:
    rows: np.ndarray  # integer row of each local maximum
    cols: np.ndarray
    maxima: np.ndarray  # pixel value at the maximum
    intensity: np.ndarray  # background-subtracted sum over the peak's connected region
    saturated: np.ndarray  # bool
    border: np.ndarray  # bool, set by crop_patches
    truncated: int = 0  # maxima left out above max_peaks

    def __len__(self) -> int:
        return len(self.rows)


def robust_background(frame: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based noise of a frame (peaks cover a small fraction of it)."""
    sample = frame[::4, ::4].astype(np.float32)
    median = float(np.median(sample))
    mad = float(np.median(np.abs(sample - median))) * 1.4826
    return median, max(mad, np.sqrt(max(median, 1.0)))


def find_peaks(
    frame: np.ndarray,
    threshold: float | None = None,
    sigma: float = 8.0,
    min_separation: int = 3,
    min_pixels: int = 3,
    saturation: float = 65535,
    max_peaks: int = 2000,
) -> Candidates:
    """Thresholded connected components, then local maxima inside each component.

    Peaks cover a small part of a frame, so after labelling everything works on the
    above-threshold pixels only (bincounts and gathered windows, not whole-frame filters).
    """
    if frame.ndim != 2:
        raise ValueError(f"expected a 2-D frame, got shape {frame.shape}")
    img = frame.astype(np.float32, copy=False)
    background, noise = robust_background(img)
    level = background + sigma * noise if threshold is None else float(threshold)
    labels, n = ndimage.label(img > level, structure=np.ones((3, 3)))
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols]
    keep = np.bincount(lab, minlength=n + 1) >= min_pixels
    keep[0] = False
    sel = keep[lab]
    rows, cols, lab = rows[sel], cols[sel], lab[sel]
    if len(rows) == 0:
        empty = np.zeros(0)
        return Candidates(
            empty.astype(int),
            empty.astype(int),
            empty,
            empty,
            empty.astype(bool),
            empty.astype(bool),
        )
    # a pixel is a local maximum if it equals the maximum of its (2s+1)^2 neighbourhood
    w = min_separation
    side = 2 * w + 1
    values = img[rows, cols]
    if len(rows) * side * side > img.size:  # a frame mostly lit: one filter costs less
        window_max = ndimage.maximum_filter(img, size=side, mode="constant", cval=-np.inf)
        is_max = values >= window_max[rows, cols]
    else:
        padded = np.pad(img, w, mode="constant", constant_values=-np.inf)
        windows = np.lib.stride_tricks.sliding_window_view(padded, (side, side))
        is_max = values >= windows[rows, cols].max(axis=(1, 2))
    mr, mc = _one_per_plateau(rows[is_max], cols[is_max], img.shape)
    truncated = max(0, len(mr) - max_peaks)
    if truncated:
        brightest = np.sort(np.argpartition(-img[mr, mc], max_peaks - 1)[:max_peaks])
        mr, mc = mr[brightest], mc[brightest]
    mr, mc = _suppress_close(img, mr, mc, min_separation)
    sums = np.bincount(lab, weights=values - background, minlength=n + 1)
    maxima = img[mr, mc]
    return Candidates(
        rows=mr,
        cols=mc,
        maxima=maxima,
        intensity=sums[labels[mr, mc]],
        saturated=maxima >= saturation,
        border=np.zeros(len(mr), bool),
        truncated=truncated,
    )


def _one_per_plateau(rows: np.ndarray, cols: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """A flat (e.g. saturated) top is many equal, touching maxima: keep its middle pixel."""
    local_max = np.zeros(shape, bool)
    local_max[rows, cols] = True
    labels, n = ndimage.label(local_max, structure=np.ones((3, 3)))
    lab = labels[rows, cols]
    count = np.bincount(lab, minlength=n + 1)[1:]
    cy = np.bincount(lab, weights=rows, minlength=n + 1)[1:] / count
    cx = np.bincount(lab, weights=cols, minlength=n + 1)[1:] / count
    d = (rows - cy[lab - 1]) ** 2 + (cols - cx[lab - 1]) ** 2
    order = np.lexsort((d, lab))  # by plateau, nearest its centre first
    first = order[np.r_[True, lab[order][1:] != lab[order][:-1]]]
    return rows[first], cols[first]


def _suppress_close(img, rows, cols, min_separation: int):
    """Keep the brighter of two maxima closer than ``min_separation`` (Chebyshev): brightest
    first, each kept one marks its neighbourhood taken (linear in the number of maxima)."""
    w = min_separation
    taken = np.zeros((img.shape[0] + 2 * w, img.shape[1] + 2 * w), bool)
    kept: list[int] = []
    for i in np.argsort(-img[rows, cols], kind="stable"):
        r, c = rows[i], cols[i]  # (r, c) in the frame is (r + w, c + w) in ``taken``
        if not taken[r : r + 2 * w + 1, c : c + 2 * w + 1].any():
            kept.append(i)
            taken[r + w, c + w] = True
    kept.sort()
    return rows[kept], cols[kept]


def crop_patches(
    frame: np.ndarray, peaks: Candidates, size: int = 11
) -> tuple[np.ndarray, np.ndarray]:
    """(patches (n, size, size) float32, top-left corners (n, 2) as (row, col)).

    Sets ``peaks.border`` for patches that needed padding at the frame edge.
    """
    if size % 2 == 0:
        raise ValueError(f"patch size must be odd, got {size}")
    half = size // 2
    if len(peaks) == 0:
        return np.zeros((0, size, size), np.float32), np.zeros((0, 2), int)
    padded = np.pad(frame.astype(np.float32, copy=False), half, mode="edge")
    tops = np.stack([peaks.rows - half, peaks.cols - half], axis=1)
    ny, nx = frame.shape
    peaks.border = (
        (tops[:, 0] < 0) | (tops[:, 1] < 0) | (tops[:, 0] + size > ny) | (tops[:, 1] + size > nx)
    )
    # a peak at frame (r, c) sits at (r + half, c + half) in the padded frame
    patches = np.stack(
        [padded[r : r + size, c : c + size] for r, c in zip(peaks.rows, peaks.cols)]
    )
    return patches, tops


def peak_patches(
    frame: np.ndarray, size: int = 11, **finder
) -> tuple[Candidates, np.ndarray, np.ndarray]:
    """:func:`find_peaks` then :func:`crop_patches`: (candidates, patches, top-left corners)."""
    peaks = find_peaks(frame, **finder)
    patches, tops = crop_patches(frame, peaks, size)
    return peaks, patches, tops
