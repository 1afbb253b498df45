"""Bragg-peak candidates in a detector frame and the fixed-size patches BraggNN reads.

Behaviour at the edges of the problem, by design:
- a frame with no pixel above threshold gives no peaks (an empty table, not an error);
- overlapping peaks: every local maximum at least ``min_separation`` pixels from a brighter
  one is its own candidate, so a merged blob of two peaks gives two patches;
- a peak whose patch would cross the frame border is cropped with edge padding and flagged
  ``border`` (its centre is still reported; a consumer may drop it);
- a peak touching the detector's saturation value is flagged ``saturated`` (its shape is
  clipped, so its centre is less certain).
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

    def __len__(self) -> int:
        return len(self.rows)


def robust_background(frame: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based noise of a frame (peaks cover a small fraction of it)."""
    sample = frame[::4, ::4].astype(np.float32)
    median = float(np.median(sample))
    mad = float(np.median(np.abs(sample - median))) * 1.4826
    return median, max(mad, np.sqrt(max(median, 1.0)))


def find_peaks(frame: np.ndarray, threshold: float | None = None, sigma: float = 8.0,
               min_separation: int = 3, min_pixels: int = 3,
               saturation: float = 65535) -> Candidates:
    """Thresholded connected components, then local maxima inside each component."""
    if frame.ndim != 2:
        raise ValueError(f"expected a 2-D frame, got shape {frame.shape}")
    img = frame.astype(np.float32, copy=False)
    background, noise = robust_background(img)
    level = background + sigma * noise if threshold is None else float(threshold)
    mask = img > level
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        empty = np.zeros(0)
        return Candidates(empty.astype(int), empty.astype(int), empty, empty,
                          empty.astype(bool), empty.astype(bool))
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    keep = np.zeros(n + 1, bool)
    keep[1:] = sizes >= min_pixels
    mask &= keep[labels]
    footprint = np.ones((2 * min_separation + 1,) * 2, bool)
    local_max = (img == ndimage.maximum_filter(img, footprint=footprint)) & mask
    rows, cols = _one_per_plateau(local_max)
    rows, cols = _suppress_close(img, rows, cols, min_separation)
    sums = ndimage.sum_labels(img - background, labels, index=np.arange(n + 1))
    maxima = img[rows, cols]
    return Candidates(rows=rows, cols=cols, maxima=maxima, intensity=sums[labels[rows, cols]],
                      saturated=maxima >= saturation, border=np.zeros(len(rows), bool))


def _one_per_plateau(local_max: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A flat (e.g. saturated) top is many equal, touching maxima: keep its middle pixel."""
    labels, n = ndimage.label(local_max, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros(0, int), np.zeros(0, int)
    centres = np.array(ndimage.center_of_mass(local_max, labels, np.arange(1, n + 1)))
    rows, cols = np.nonzero(local_max)
    pick = []
    for k, (cy, cx) in enumerate(centres, start=1):
        idx = np.flatnonzero(labels[rows, cols] == k)
        pick.append(idx[np.argmin((rows[idx] - cy) ** 2 + (cols[idx] - cx) ** 2)])
    pick = np.array(pick)
    return rows[pick], cols[pick]


def _suppress_close(img, rows, cols, min_separation: int):
    """Keep the brighter of two maxima closer than ``min_separation`` (Chebyshev)."""
    order = np.argsort(-img[rows, cols], kind="stable")
    kept: list[int] = []
    for i in order:
        if all(max(abs(rows[i] - rows[j]), abs(cols[i] - cols[j])) > min_separation
               for j in kept):
            kept.append(i)
    kept.sort()
    return rows[kept], cols[kept]


def crop_patches(frame: np.ndarray, peaks: Candidates, size: int = 11
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
    peaks.border = ((tops[:, 0] < 0) | (tops[:, 1] < 0) | (tops[:, 0] + size > ny)
                    | (tops[:, 1] + size > nx))
    # a peak at frame (r, c) sits at (r + half, c + half) in the padded frame
    patches = np.stack([padded[r:r + size, c:c + size] for r, c in zip(peaks.rows, peaks.cols)])
    return patches, tops


def peak_patches(frame: np.ndarray, size: int = 11, **finder
                 ) -> tuple[Candidates, np.ndarray, np.ndarray]:
    """:func:`find_peaks` then :func:`crop_patches`: (candidates, patches, top-left corners)."""
    peaks = find_peaks(frame, **finder)
    patches, tops = crop_patches(frame, peaks, size)
    return peaks, patches, tops
