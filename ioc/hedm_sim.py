"""Simulated High-Energy Diffraction Microscopy (HEDM) detector frames.

A fixed set of Bragg reflections (from ``HedmConfig.seed``) sits on a few Debye-Scherrer
rings around the frame centre.  As the sample rotates (omega, degrees) each reflection is
lit only near its diffraction condition ``omega_peak`` (a Gaussian in omega of sigma
``omega_width_deg``), and its azimuth on the ring drifts slowly with omega, so a step scan
sees spots appear, move a fraction of a pixel per step, and fade.

Peak shape: a separable 2-D pseudo-Voigt, ``eta * Lx * Ly + (1 - eta) * Gx * Gy`` with
Lorentzian / Gaussian profiles of the given FWHMs along x (columns) and y (rows).  The product
form has a finite integral and is integrated exactly over each pixel (erf / arctan), so no
supersampling is needed.  Pixel (row r, column c) covers ``[c - 0.5, c + 0.5]`` in x;
coordinates are continuous pixel units with pixel centres at integers.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import stats
from scipy.special import erf

from edgeloop.config import HedmConfig

log = logging.getLogger(__name__)

_K = 2.0 * math.sqrt(math.log(2.0))  # Gaussian exp(-(K u / fwhm)^2) has the given FWHM
_GAUSS_AREA = math.sqrt(math.pi) / _K  # integral of that Gaussian per unit FWHM (1.0645)
# fcc h^2 + k^2 + l^2 of the first rings (111, 200, 220, 311, 222, ...): ring spacing
_FCC_HKL2 = (3, 4, 8, 11, 12, 16, 19, 20, 24, 27)

REFLECTION_DTYPE = np.dtype(
    [
        ("grain", np.int32),
        ("ring", np.int32),
        ("radius", np.float64),
        ("azimuth0", np.float64),  # radians, azimuth at the diffraction condition
        ("omega_peak", np.float64),  # degrees
        ("intensity", np.float64),  # peak height (counts) at the diffraction condition
        ("fwhm_x", np.float64),
        ("fwhm_y", np.float64),
        ("eta", np.float64),
        ("asym", np.float64),
    ]
)

TRUTH_DTYPE = np.dtype(
    [
        ("index", np.int32),  # row of HedmSimulator.reflections
        ("x", np.float64),  # true centre, pixels (x = column, y = row)
        ("y", np.float64),
        ("intensity", np.float64),  # integrated counts above background (analytic)
        ("height", np.float64),  # peak height, counts above background
        ("fwhm_x", np.float64),
        ("fwhm_y", np.float64),
        ("eta", np.float64),
        ("asym", np.float64),
        ("saturated", np.bool_),
    ]
)


def _profiles(coords, x0, fwhm, asym=0.0, integrate: bool = True):
    """Gaussian and Lorentzian 1-D profiles (height 1 at x0), pixel-averaged when integrate.

    The FWHM is ``fwhm * (1 + asym)`` on the +x side of x0.  Arguments broadcast.
    """
    coords = np.asarray(coords, np.float64)
    fwhm = np.asarray(fwhm, np.float64)
    right = fwhm * (1.0 + np.asarray(asym, np.float64))
    if not integrate:
        u = coords - x0
        f = np.where(u > 0, right, fwhm)
        return np.exp(-((_K * u / f) ** 2)), 1.0 / (1.0 + (2.0 * u / f) ** 2)

    def antiderivatives(u):
        f = np.where(u > 0, right, fwhm)
        return (0.5 * _GAUSS_AREA * f * erf(_K * u / f), 0.5 * f * np.arctan(2.0 * u / f))

    g_hi, l_hi = antiderivatives(coords + 0.5 - x0)
    g_lo, l_lo = antiderivatives(coords - 0.5 - x0)
    return g_hi - g_lo, l_hi - l_lo


def pseudo_voigt_integral(amplitude, fwhm_x, fwhm_y, eta, asym=0.0):
    """Analytic integral (counts) of the separable pseudo-Voigt over the whole plane."""
    fx = np.asarray(fwhm_x, np.float64) * (1.0 + 0.5 * np.asarray(asym, np.float64))
    return amplitude * (
        eta * (0.5 * np.pi) ** 2 * fx * fwhm_y + (1.0 - eta) * _GAUSS_AREA**2 * fx * fwhm_y
    )


def _half_box(amplitude, fwhm, eta, tol):
    """Distance (pixels) beyond which a peak's profile along one axis is below ``tol``."""
    ratio = max(amplitude / max(tol, 1e-12), 1.0)
    gauss = fwhm / _K * math.sqrt(math.log(ratio))
    lorentz = 0.5 * fwhm * math.sqrt(max(eta * ratio - 1.0, 0.0))
    return max(gauss, lorentz, 2.0 * fwhm)


def add_pseudo_voigt(
    image: np.ndarray,
    x0: float,
    y0: float,
    amplitude: float,
    fwhm_x: float,
    fwhm_y: float,
    eta: float,
    asym: float = 0.0,
    tol: float = 0.5,
    integrate: bool = True,
) -> None:
    """Add one peak into ``image`` (in place), inside the box where it exceeds ``tol``.

    ``tol <= 0`` renders over the whole image.
    """
    ny, nx = image.shape
    if tol > 0:
        hx = _half_box(amplitude, fwhm_x * (1.0 + abs(asym)), eta, tol)
        hy = _half_box(amplitude, fwhm_y, eta, tol)
        c0, c1 = max(int(x0 - hx), 0), min(math.ceil(x0 + hx) + 1, nx)
        r0, r1 = max(int(y0 - hy), 0), min(math.ceil(y0 + hy) + 1, ny)
    else:
        c0, c1, r0, r1 = 0, nx, 0, ny
    if c0 >= c1 or r0 >= r1:
        return
    gx, lx = _profiles(np.arange(c0, c1), x0, fwhm_x, asym, integrate)
    gy, ly = _profiles(np.arange(r0, r1), y0, fwhm_y, 0.0, integrate)
    image[r0:r1, c0:c1] += amplitude * (eta * np.outer(ly, lx) + (1.0 - eta) * np.outer(gy, gx))


def pseudo_voigt_2d(
    shape: tuple[int, int],
    x0: float,
    y0: float,
    amplitude: float,
    fwhm_x: float,
    fwhm_y: float,
    eta: float,
    asym: float = 0.0,
    *,
    integrate: bool = True,
    tol: float = 0.0,
) -> np.ndarray:
    """2-D pseudo-Voigt ``eta * L + (1 - eta) * G`` centred at sub-pixel (x0, y0).

    x is the column, y the row; ``asym`` widens the +x side to ``fwhm_x * (1 + asym)``.
    ``integrate`` averages over each pixel (exact); otherwise samples pixel centres.
    ``tol > 0`` renders only the box where the peak exceeds ``tol`` (zeros elsewhere).
    """
    image = np.zeros(shape, np.float64)
    add_pseudo_voigt(image, x0, y0, amplitude, fwhm_x, fwhm_y, eta, asym, tol, integrate)
    return image


def ring_radii(cfg: HedmConfig) -> np.ndarray:
    """Ring radii in pixels: fcc-like spacing mapped onto ``ring_radius_range``."""
    lo, hi = cfg.ring_radius_range
    if cfg.n_rings <= 1:
        return np.array([lo * cfg.frame_size])
    if cfg.n_rings <= len(_FCC_HKL2):
        q = np.sqrt(np.array(_FCC_HKL2[: cfg.n_rings], np.float64))
        frac = (q - q[0]) / (q[-1] - q[0])
    else:
        frac = np.linspace(0.0, 1.0, cfg.n_rings)
    return (lo + (hi - lo) * frac) * cfg.frame_size


def make_reflections(cfg: HedmConfig) -> np.ndarray:
    """The fixed random reflection set (structured array, ``REFLECTION_DTYPE``)."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_grains * cfg.reflections_per_grain
    refl = np.zeros(n, REFLECTION_DTYPE)
    radii = ring_radii(cfg)
    refl["grain"] = np.repeat(np.arange(cfg.n_grains), cfg.reflections_per_grain)
    refl["ring"] = rng.integers(0, cfg.n_rings, n)
    refl["radius"] = radii[refl["ring"]]
    refl["azimuth0"] = rng.uniform(0.0, 2.0 * np.pi, n)
    refl["omega_peak"] = rng.uniform(0.0, 360.0, n)
    refl["intensity"] = rng.uniform(*cfg.intensity_range, n)
    # a grain's mosaicity sets its peaks' typical width and shape; reflections vary about it
    flo, fhi = cfg.fwhm_range
    elo, ehi = cfg.eta_range
    grain_fwhm = rng.uniform(flo, fhi, cfg.n_grains)[refl["grain"]]
    grain_eta = rng.uniform(elo, ehi, cfg.n_grains)[refl["grain"]]
    refl["fwhm_x"] = np.clip(grain_fwhm * rng.uniform(0.85, 1.15, n), flo, fhi)
    refl["fwhm_y"] = np.clip(grain_fwhm * rng.uniform(0.85, 1.15, n), flo, fhi)
    refl["eta"] = np.clip(grain_eta + rng.normal(0.0, 0.05, n), elo, ehi)
    refl["asym"] = rng.uniform(-cfg.asym_max, cfg.asym_max, n)
    # near-identical orientations (sub-grains, twins) put pairs of spots a few pixels apart
    # at nearly the same omega: overlapping peaks
    n_pairs = int(cfg.overlap_fraction * n / 2)
    order = rng.permutation(n)
    for a, b in zip(order[:n_pairs], order[n_pairs : 2 * n_pairs]):
        refl["ring"][b], refl["radius"][b] = refl["ring"][a], refl["radius"][a]
        offset_px = rng.uniform(2.0, 6.0) * rng.choice([-1.0, 1.0])
        refl["azimuth0"][b] = refl["azimuth0"][a] + offset_px / refl["radius"][a]
        refl["omega_peak"][b] = (
            refl["omega_peak"][a] + rng.uniform(-1.0, 1.0) * cfg.omega_width_deg
        ) % 360.0
    return refl


class ConstantPoisson:
    """Exact Poisson(lam) samples for one fixed mean, by table inversion of 32-bit uniforms.

    Several times faster than ``Generator.poisson`` for a whole frame of background.
    """

    def __init__(self, lam: float):
        kmax = int(lam + 12.0 * math.sqrt(lam) + 12.0)
        scale = 2.0**32
        cdf = np.floor(stats.poisson.cdf(np.arange(kmax + 1), lam) * scale)
        cdf[-1] = scale
        self.cdf = cdf.astype(np.uint64)
        # guide table: first candidate for each of 2^16 buckets of the uniform's high bits
        starts = np.arange(1 << 16, dtype=np.uint64) << np.uint64(16)
        self.guide = np.searchsorted(self.cdf, starts, side="right")

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        r = rng.integers(0, 1 << 32, int(np.prod(shape)), dtype=np.uint64)
        k = self.guide[r >> np.uint64(16)]
        todo = np.flatnonzero(self.cdf[k] <= r)
        while todo.size:  # a few pixels per frame step past their bucket's first value
            k[todo] += 1
            todo = todo[self.cdf[k[todo]] <= r[todo]]
        return k.reshape(shape)


class HedmSimulator:
    """Reflections built once; ``frame(omega)`` gives a noisy uint16 frame and its truth."""

    def __init__(self, cfg: HedmConfig):
        self.cfg = cfg
        self.reflections = make_reflections(cfg)
        self.centre = (cfg.frame_size / 2.0, cfg.frame_size / 2.0)  # (x, y) of the beam
        self.rng = np.random.default_rng(cfg.seed + 1)
        self._background_noise = ConstantPoisson(cfg.background)
        log.debug("HEDM simulator: %d reflections on %d rings", len(self.reflections), cfg.n_rings)

    def truth(self, omega_deg: float) -> np.ndarray:
        """Lit reflections at ``omega_deg`` (``TRUTH_DTYPE``; ``saturated`` not yet set)."""
        refl, cfg = self.reflections, self.cfg
        d_omega = (omega_deg - refl["omega_peak"] + 180.0) % 360.0 - 180.0
        height = refl["intensity"] * np.exp(-0.5 * (d_omega / cfg.omega_width_deg) ** 2)
        lit = np.flatnonzero(height >= cfg.min_height)
        r = refl[lit]
        az = r["azimuth0"] + cfg.azimuth_drift_rad * np.sin(np.radians(d_omega[lit]))
        out = np.zeros(len(lit), TRUTH_DTYPE)
        out["index"] = lit
        out["x"] = self.centre[0] + r["radius"] * np.cos(az)
        out["y"] = self.centre[1] + r["radius"] * np.sin(az)
        out["height"] = height[lit]
        for name in ("fwhm_x", "fwhm_y", "eta", "asym"):
            out[name] = r[name]
        out["intensity"] = pseudo_voigt_integral(
            out["height"], r["fwhm_x"], r["fwhm_y"], r["eta"], r["asym"]
        )
        return out

    def frame(self, omega_deg: float, noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(image uint16 (N, N), truth) at rotation ``omega_deg``; Poisson noise if ``noise``."""
        cfg = self.cfg
        n = cfg.frame_size
        truth = self.truth(omega_deg)
        signal = np.zeros((n, n))
        for p in truth:
            add_pseudo_voigt(
                signal,
                p["x"],
                p["y"],
                p["height"],
                p["fwhm_x"],
                p["fwhm_y"],
                p["eta"],
                p["asym"],
                cfg.render_tol,
            )
        if noise:  # Poisson(background + signal) = Poisson(background) + Poisson(signal)
            image = self._background_noise.sample(self.rng, (n, n)).astype(np.float64)
            lit = signal > 0
            image[lit] += self.rng.poisson(signal[lit])
        else:
            image = np.rint(signal + cfg.background)
        # flagged when any pixel next to the peak's centre reaches the detector's ceiling
        rows = np.clip(np.rint(truth["y"]).astype(int), 1, n - 2)
        cols = np.clip(np.rint(truth["x"]).astype(int), 1, n - 2)
        near = (
            np.max([image[rows + dr, cols + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)], axis=0)
            if len(truth)
            else np.zeros(0)
        )
        truth["saturated"] = near >= cfg.saturation
        np.clip(image, 0, cfg.saturation, out=image)
        return image.astype(np.uint16), truth


def make_patch_dataset(
    n_peaks: int, patch: int = 11, seed: int = 0, cfg: HedmConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Isolated noisy peaks rendered straight into patches, for training and accuracy checks.

    Centres are uniform within +-1.5 px of the patch centre; shapes and heights uniform over
    ``cfg``'s ranges; background and Poisson noise as in a frame.  Returns (patches float32
    (n, patch, patch) in counts, true centres float32 (n, 2) as (x, y) in patch pixels).
    """
    cfg = cfg or HedmConfig()
    rng = np.random.default_rng(seed)
    n = int(n_peaks)
    mid = (patch - 1) / 2.0
    x0 = mid + rng.uniform(-1.5, 1.5, n)
    y0 = mid + rng.uniform(-1.5, 1.5, n)
    amp = rng.uniform(*cfg.intensity_range, n)
    fx = rng.uniform(*cfg.fwhm_range, n)
    fy = rng.uniform(*cfg.fwhm_range, n)
    eta = rng.uniform(*cfg.eta_range, n)
    asym = rng.uniform(-cfg.asym_max, cfg.asym_max, n)
    coords = np.arange(patch)[None, :]
    gx, lx = _profiles(coords, x0[:, None], fx[:, None], asym[:, None])
    gy, ly = _profiles(coords, y0[:, None], fy[:, None])
    eta3 = eta[:, None, None]
    expected = amp[:, None, None] * (
        eta3 * ly[:, :, None] * lx[:, None, :] + (1.0 - eta3) * gy[:, :, None] * gx[:, None, :]
    )
    patches = rng.poisson(expected + cfg.background).astype(np.float32)
    return patches, np.stack([x0, y0], axis=1).astype(np.float32)
