"""Label-free quality of the edge's answers, one figure per frame, from the frame itself.

Ptychography: :class:`DataResidual` puts the predicted object patch back through the forward
model the detector obeys (exit wave = probe x amplitude x exp(i phase), far-field intensity
= |FFT|^2, zero frequency at the centre) and measures how far the predicted diffraction
moduli are from the measured ones, above what Poisson noise alone would leave.  A network
whose output ignores its input (an untrained, flat one) predicts the probe's own diffraction
and gets a large residual, where the overlap check of :mod:`.stitch` would call it perfect.

HEDM: :func:`centroid_distance`, how far BraggNN's sub-pixel centres are from the
centroids of the same background-subtracted patches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import fft, stats

from edgeloop.optics import centring_sign, illuminated_mask, make_probe


def _sqrt_poisson_deviation(lam: np.ndarray) -> np.ndarray:
    """E[(sqrt(n) - sqrt(lam))^2] for n ~ Poisson(lam), exactly (lam up to a few thousand):
    the variance of sqrt(n) plus its bias squared, which matters where lam < 10."""
    k = np.arange(int(lam.max() + 12 * np.sqrt(lam.max()) + 30))
    pmf = stats.poisson.pmf(k[None, :], lam[:, None])
    return 2 * lam - 2 * np.sqrt(lam) * (pmf @ np.sqrt(k))


# E[(sqrt(n) - sqrt(lam))^2] tabulated against sqrt(lam) (what the residual has at hand), in
# steps of 1/32 up to lam = 256: ~lam for lam << 1, a hump of 0.46 near lam = 1, then 1/4 (the
# variance-stabilising property of the square root; 0.2505 at lam = 256, 1/4 beyond).
_ROOT_STEP = 32
_DEV = _sqrt_poisson_deviation(np.arange(16 * _ROOT_STEP + 1) ** 2 / _ROOT_STEP**2)
_DEV = np.append(_DEV, [0.25, 0.25]).astype(np.float32)


def sqrt_poisson_deviation(root_lam: np.ndarray) -> np.ndarray:
    """E[(sqrt(n) - sqrt(lam))^2], n ~ Poisson(lam), per element, given sqrt(lam)
    (interpolated linearly in the table)."""
    t = np.minimum(np.asarray(root_lam, np.float32) * _ROOT_STEP, len(_DEV) - 1.0)
    i = t.astype(np.intp)
    frac = t - i
    i = np.minimum(i, len(_DEV) - 2, out=i)
    lo = _DEV[i]
    return lo + frac * (_DEV[i + 1] - lo)


def load_probe(path: str | Path) -> np.ndarray:
    """A complex (N, N) probe from a ``.npy`` file (e.g. a previous reconstruction's),
    scaled to unit total power (the residual fits the scale)."""
    probe = np.load(Path(path).expanduser(), allow_pickle=False)
    if probe.ndim != 2 or probe.shape[0] != probe.shape[1] or not np.isfinite(probe).all():
        raise ValueError(f"{path}: a probe must be a finite square 2-D array, got {probe.shape}")
    power = float(np.sum(np.abs(probe) ** 2))
    if power <= 0:
        raise ValueError(f"{path}: the probe is all zero")
    return (probe / np.sqrt(power)).astype(np.complex64)


def edge_probe(probe_file: str, frame_size: int, radius_px: float, defocus: float) -> np.ndarray:
    """The probe the edge checks predictions with: ``probe_file`` when given, else the
    nominal optics (a defocused circular aperture, as the simulator makes it)."""
    if probe_file:
        return load_probe(probe_file)
    return make_probe(frame_size, radius_px, defocus)


class DataResidual:
    """How far a predicted object patch is from explaining its own diffraction pattern.

    ``residual(frame, amplitude, phase, surround)``: the measured moduli m = sqrt(frame)
    against the predicted ones a = |fftshift(fft2(probe * object))| with their one unknown
    scale s fitted (least squares: the amplitude output is normalised, the flux is not
    known), as an amplitude R-factor with the Poisson floor removed:

        R = gain * sqrt(max(sum (s a - m)^2 - sum E(sqrt n - s a)^2, 0) / sum m^2)

    where the expectation is over Poisson counts n of mean (s a)^2 (tabulated), so an exact
    prediction gives R near 0 at any flux.  By Parseval R / gain is a lower bound of the
    relative exit-wave error, which for a phase object is the probe-weighted RMS phase error
    in radians; the detector measures moduli only, so about half of that error shows (for
    errors of random sign): ``gain`` (default sqrt 2) scales R back to it.

    The object: the prediction where the probe lights the sample (``illuminated_mask``, the
    pixels the network is trained on and judged by; outside them its output is not trained
    and measured at several tenths of a radian off), and beyond that the probe's tails
    (~17 % of its power) see ``surround``, what the stitched map already holds there
    (:meth:`~edgeloop.edge_pva.stitch.PhaseMap.surroundings`, NaN where unknown; its offset
    matched to the prediction's), else a featureless object (the lit mean).  The unknown
    surroundings leave a floor of a few hundredths of a radian.  None when the frame is not
    the probe's size.
    """

    def __init__(self, probe: np.ndarray, gain: float = np.sqrt(2.0), lit: float = 0.1):
        probe = np.asarray(probe, np.complex64)
        if probe.ndim != 2 or probe.shape[0] != probe.shape[1] or probe.shape[0] % 2:
            raise ValueError(f"the probe must be square with an even side, got {probe.shape}")
        self.probe = probe
        self.lit = illuminated_mask(probe, lit)
        self._shifted_probe = (probe * centring_sign(probe.shape[0])).astype(np.complex64)
        self.gain = float(gain)

    @property
    def size(self) -> int:
        return self.probe.shape[0]

    def object_patch(
        self, amplitude: np.ndarray, phase: np.ndarray, surround: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(amplitude, phase) the residual puts through the probe: the prediction where lit,
        the surroundings (offset-matched) or the lit mean elsewhere."""
        lit = self.lit
        amplitude = np.asarray(amplitude, np.float32)
        phase = np.asarray(phase, np.float32)
        fill = np.full(phase.shape, phase[lit].mean(), np.float32)
        if surround is not None:
            known = np.isfinite(surround)
            both = known & lit
            if both.any():
                fill[known] = surround[known] + (phase[both] - surround[both]).mean()
        return (
            np.where(lit, amplitude, amplitude[lit].mean()),
            np.where(lit, phase, fill),
        )

    def predicted_moduli(self, amplitude: np.ndarray, phase: np.ndarray) -> np.ndarray:
        """|far field| of probe * amplitude * exp(i phase), zero frequency at the centre,
        unscaled."""
        phase = np.asarray(phase, np.float32)
        obj = np.empty(phase.shape, np.complex64)
        obj.real, obj.imag = np.cos(phase), np.sin(phase)
        obj *= self._shifted_probe
        obj *= np.asarray(amplitude, np.float32)
        return np.abs(fft.fft2(obj, overwrite_x=True))

    def __call__(
        self,
        frame: np.ndarray,
        amplitude: np.ndarray,
        phase: np.ndarray,
        surround: np.ndarray | None = None,
    ) -> float | None:
        return self.batch([(frame, amplitude, phase, surround)])[0]

    def batch(self, items: list[tuple]) -> list[float | None]:
        """The residual of each (frame, amplitude, phase, surround), the far fields of all
        of them from one FFT call (what a batch of answers costs the edge)."""
        out: list[float | None] = [None] * len(items)
        measured, objects = [], []
        for i, (frame, amplitude, phase, surround) in enumerate(items):
            if frame.shape != self.probe.shape or np.shape(phase) != self.probe.shape:
                continue
            m = np.sqrt(np.maximum(frame, 0).astype(np.float32, copy=False)).ravel()
            with np.errstate(over="ignore"):  # counts near float32's limit: no residual
                total = float(np.dot(m, m))
            if not 0 < total < np.inf:
                continue
            measured.append((i, m, total))
            objects.append(self.object_patch(amplitude, phase, surround))
        if not objects:
            return out
        amplitudes, phases = (np.stack(parts) for parts in zip(*objects))
        for (i, m, total), a in zip(measured, self.predicted_moduli(amplitudes, phases)):
            out[i] = self._r_factor(m, total, a.ravel())
        return out

    def _r_factor(self, m: np.ndarray, total: float, a: np.ndarray) -> float | None:
        aa = float(np.dot(a, a))
        if not aa > 0:
            return self.gain  # no light predicted at all: nothing is explained
        a *= float(np.dot(a, m)) / aa  # the least-squares scale
        noise = float(sqrt_poisson_deviation(a).sum())  # what an exact prediction leaves
        a -= m
        with np.errstate(over="ignore"):
            excess = float(np.dot(a, a)) - noise
        if not np.isfinite(excess):
            return None
        return self.gain * float(np.sqrt(max(excess, 0.0) / total))


def centroid_distance(
    patches: np.ndarray, centres_px: np.ndarray, min_signal: float = 1e-6
) -> np.ndarray:
    """Per patch, the distance (pixels) between ``centres_px`` ((n, 2) as (x, y) in patch
    pixels, pixel i's centre at i) and the patch's centroid: background (the median of its
    border pixels) subtracted, negative values clipped, weighted by the square of what is
    left, so the peak's core counts more than its tails, noise and a neighbour's flank
    (measured on simulated frames: the centroid is 0.20 px from the true centre this way,
    0.24 px with linear weights).  A patch with no signal above background gets NaN."""
    p = np.asarray(patches, np.float64)
    n, size, _ = p.shape
    if n == 0:
        return np.zeros(0)
    border = np.concatenate([p[:, 0, :], p[:, -1, :], p[:, 1:-1, 0], p[:, 1:-1, -1]], axis=1)
    signal = np.clip(p - np.median(border, axis=1)[:, None, None], 0, None) ** 2
    weight = signal.sum(axis=(1, 2))
    idx = np.arange(size, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (signal.sum(axis=1) @ idx) / weight
        cy = (signal.sum(axis=2) @ idx) / weight
    d = np.hypot(np.asarray(centres_px)[:, 0] - cx, np.asarray(centres_px)[:, 1] - cy)
    return np.where(weight > min_signal, d, np.nan)


def combine(overlap: float | None, data: float | None) -> float | None:
    """The published figure: the two label-free figures (both rad, each a lower bound of
    the frame's phase error) added in quadrature; either alone when the other is missing."""
    parts = [v for v in (overlap, data) if v is not None]
    if not parts:
        return None
    return float(np.sqrt(sum(v * v for v in parts)))
