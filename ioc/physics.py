"""Pure functions for the simulated ptychography experiment.

Geometry: the object is a square array of ``object_size`` pixels of ``pixel_um`` each,
stage position (0, 0) at its centre.  A frame at stage position (x, y) illuminates the
``frame_size`` x ``frame_size`` patch whose centre is at object pixel
``(object_size / 2 + y / pixel_um, object_size / 2 + x / pixel_um)`` (row, column).
"""

from __future__ import annotations

import numpy as np

from edgeloop.config import SimConfig
from edgeloop.optics import extract_patch, make_probe


def _disk(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return image
    ky = np.fft.fftfreq(image.shape[0])[:, None]
    kx = np.fft.fftfreq(image.shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (ky**2 + kx**2))
    return np.real(np.fft.ifft2(np.fft.fft2(image) * kernel))


def make_phase(cfg: SimConfig) -> np.ndarray:
    """Phase of an etched test pattern: Siemens stars, bars, dots and smooth grains."""
    n = cfg.object_size
    rng = np.random.default_rng(cfg.seed)
    phase = np.zeros((n, n), np.float64)
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    # Siemens stars on a grid
    cell = max(n // 8, 16)
    for cy in range(cell // 2, n, cell):
        for cx in range(cell // 2, n, cell):
            r0 = rng.uniform(0.3, 0.45) * cell
            spokes = int(rng.integers(6, 16))
            ang = np.arctan2(yy - cy, xx - cx)
            rad = np.hypot(yy - cy, xx - cx)
            star = (np.sin(spokes * ang + rng.uniform(0, np.pi)) > 0) & (rad < r0)
            phase[star] = rng.uniform(0.5, 1.0)
    # bars and rectangles
    for _ in range(n // 3):
        h, w = rng.integers(3, 24, size=2)
        y0, x0 = rng.integers(0, n - 24, size=2)
        phase[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0.2, 1.0)
    # dots
    for _ in range(n // 2):
        cy, cx = rng.uniform(0, n, size=2)
        phase[_disk((n, n), cy, cx, rng.uniform(1.5, 5))] = rng.uniform(0.2, 0.9)
    # smooth grains so no patch is blank
    noise = rng.standard_normal((n, n))
    k = np.fft.fftfreq(n)
    blur = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2 * 0.02**2))
    grains = np.real(np.fft.ifft2(np.fft.fft2(noise) * blur))
    grains = (grains - grains.min()) / (np.ptp(grains) + 1e-12)
    # soft edges, as an etched pattern has at 10 nm pixels; sharp-edged patterns also need far
    # more training than a CPU demo allows before a network learns them
    phase = _blur(phase, cfg.feature_blur_px)
    phase = np.clip(0.75 * phase + 0.25 * grains, 0, 1)
    return (cfg.max_phase * phase).astype(np.float32)


def make_object(cfg: SimConfig) -> np.ndarray:
    """Complex transmission of the simulated sample."""
    phase = make_phase(cfg).astype(np.float64)
    return (np.exp(-cfg.absorption * phase) * np.exp(1j * phase)).astype(np.complex64)


def position_to_pixel(x_um: float, y_um: float, cfg: SimConfig) -> tuple[float, float]:
    """Object-pixel (row, col) of the top-left corner of the patch seen at stage (x, y)."""
    half = cfg.object_size / 2 - cfg.frame_size / 2
    return half + y_um / cfg.pixel_um, half + x_um / cfg.pixel_um


def diffraction(
    probe: np.ndarray, patch: np.ndarray, photons: float, rng: np.random.Generator | None
) -> np.ndarray:
    """Far-field intensity (zero frequency at the centre), scaled to ``photons``; Poisson
    if rng."""
    wave = np.fft.fftshift(np.fft.fft2(probe * patch, norm="ortho"))
    intensity = np.abs(wave) ** 2
    intensity *= photons / max(float(intensity.sum()), 1e-30)
    if rng is None:
        return intensity.astype(np.float32)
    return rng.poisson(intensity).astype(np.int32)


class PtychoSimulator:
    """Object + probe built once; ``frame(x, y)`` gives a noisy diffraction pattern."""

    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        self.obj = make_object(cfg)
        self.probe = make_probe(cfg.frame_size, cfg.probe_radius_px, cfg.probe_defocus)
        self.rng = np.random.default_rng(cfg.seed + 1)

    def patch(self, x_um: float, y_um: float) -> np.ndarray:
        row, col = position_to_pixel(x_um, y_um, self.cfg)
        return extract_patch(self.obj, row, col, self.cfg.frame_size)

    def true_phase(self, x_um: float, y_um: float) -> np.ndarray:
        return np.angle(self.patch(x_um, y_um)).astype(np.float32)

    def frame(self, x_um: float, y_um: float, noise: bool = True) -> np.ndarray:
        return diffraction(
            self.probe, self.patch(x_um, y_um), self.cfg.photons, self.rng if noise else None
        )

    @property
    def max_travel_um(self) -> float:
        """Largest |x| or |y| whose patch still lies inside the object."""
        return (self.cfg.object_size / 2 - self.cfg.frame_size / 2 - 6) * self.cfg.pixel_um
