"""Illumination model and patch geometry, shared by the simulator (ioc/) and the label
maker (remote/): a beamline knows its nominal optics (aperture, defocus), and both sides
cut object patches at fractional positions the same way."""

from __future__ import annotations

import numpy as np


def make_probe(
    frame_size: int, radius_px: float, defocus: float, modulus: np.ndarray | None = None
) -> np.ndarray:
    """Complex illumination at the sample: a defocused circular aperture, unit total power.
    ``defocus``: the pupil's quadratic phase, radians at ``radius_px``; ``modulus``: a
    measured pupil's modulus (frame_size x frame_size, zero frequency at the centre) in
    place of the aperture's disc."""
    k = np.fft.fftshift(np.fft.fftfreq(frame_size)) * frame_size
    ky, kx = np.meshgrid(k, k, indexing="ij")
    rho2 = (ky**2 + kx**2) / radius_px**2
    aperture = (rho2 <= 1.0) if modulus is None else modulus
    pupil = aperture * np.exp(1j * defocus * rho2)
    probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(pupil)))
    probe /= np.sqrt(np.sum(np.abs(probe) ** 2))
    return probe.astype(np.complex64)


def centring_sign(n: int) -> np.ndarray:
    """(-1)^(row + col) on an even n x n grid: multiplied into the exit wave, it moves the
    zero frequency of its FFT to the centre, as the detector sees it (fftshift folded into
    the probe); the far-field model of the edge's data residual and of physics-informed
    training."""
    if n % 2:
        raise ValueError(f"the centred far field needs an even side, got {n}")
    return (1 - 2 * ((np.arange(n)[:, None] + np.arange(n)[None, :]) % 2)).astype(np.float32)


def illuminated_mask(probe: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    power = np.abs(probe) ** 2
    return power > fraction * power.max()


def extract_patch(obj: np.ndarray, row: float, col: float, size: int) -> np.ndarray:
    """size x size patch with top-left corner at fractional (row, col); Fourier sub-pixel shift."""
    r0, c0 = int(np.floor(row)), int(np.floor(col))
    fr, fc = row - r0, col - c0
    ny, nx = obj.shape
    if r0 < 0 or c0 < 0 or r0 + size + 1 > ny or c0 + size + 1 > nx:
        raise ValueError(f"patch at ({row:.1f}, {col:.1f}) leaves the {ny}x{nx} object")
    if fr == 0 and fc == 0:
        return obj[r0 : r0 + size, c0 : c0 + size]
    pad = 4
    lo_r, lo_c = max(r0 - pad, 0), max(c0 - pad, 0)
    big = obj[lo_r : r0 + size + pad, lo_c : c0 + size + pad]
    ky = np.fft.fftfreq(big.shape[0])[:, None]
    kx = np.fft.fftfreq(big.shape[1])[None, :]
    shifted = np.fft.ifft2(np.fft.fft2(big) * np.exp(2j * np.pi * (ky * fr + kx * fc)))
    return shifted[r0 - lo_r : r0 - lo_r + size, c0 - lo_c : c0 - lo_c + size].astype(obj.dtype)
