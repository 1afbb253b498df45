"""Conventional Bragg-peak analysis: a 2-D pseudo-Voigt fit per patch (labels for BraggNN).

Model: ``amplitude * (eta * Lx * Ly + (1 - eta) * Gx * Gy) + background``, a separable
pseudo-Voigt with Lorentzian / Gaussian profiles of FWHM ``fwhm_x`` (columns) and ``fwhm_y``
(rows), averaged over each pixel (exact, via erf / arctan), with an analytic Jacobian.  The
shape is symmetric; a real peak's asymmetry is left to the residual.  Coordinates are patch
pixels, x = column, pixel centres at integers.  Independent of ``ioc/`` by design.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares
from scipy.special import erf

log = logging.getLogger(__name__)

_K = 2.0 * math.sqrt(math.log(2.0))
_GAUSS_AREA = math.sqrt(math.pi) / _K
MIN_SNR = 7.0  # fitted peak pixel above background, over residual rms: below, no peak
N_PARAMS = 7  # x, y, amplitude, fwhm_x, fwhm_y, eta, background
MAX_NFEV = 60  # a real peak converges in 5-15 evaluations; noise can wander for hundreds


@dataclass
class FitResult:
    x: float  # patch pixels, x = column
    y: float
    amplitude: float  # peak height above background, input units
    fwhm_x: float
    fwhm_y: float
    eta: float  # Lorentzian fraction
    background: float
    success: bool
    message: str
    nfev: int = 0


def _axes(params, yy: np.ndarray, xx: np.ndarray):
    """Pixel-averaged Gaussian and Lorentzian profiles (height 1) along x (row 0) and y
    (row 1), padded to a common length, with their derivatives by centre and by FWHM."""
    x0, y0, _, fx, fy = params[:5]
    n = max(len(xx), len(yy))
    coords = np.zeros((2, n))
    coords[0, : len(xx)], coords[1, : len(yy)] = xx, yy
    centre, fwhm = np.array([[x0], [y0]]), np.array([[fx], [fy]])
    edges = np.stack([coords + 0.5 - centre, coords - 0.5 - centre])  # (hi/lo, axis, n)
    s = edges / fwhm
    eg, er = np.exp(-((_K * s) ** 2)), erf(_K * s)
    el, at = 1.0 / (1.0 + (2.0 * s) ** 2), np.arctan(2.0 * s)
    c = 0.5 * _GAUSS_AREA
    g = c * fwhm * (er[0] - er[1])
    g_c = -(eg[0] - eg[1])
    g_f = c * (er[0] - er[1]) - (s[0] * eg[0] - s[1] * eg[1])
    lor = 0.5 * fwhm * (at[0] - at[1])
    l_c = -(el[0] - el[1])
    l_f = 0.5 * (at[0] - at[1]) - (s[0] * el[0] - s[1] * el[1])
    nx, ny = len(xx), len(yy)
    return [(a[0, :nx], a[1, :ny]) for a in (g, lor, g_c, l_c, g_f, l_f)]


def _model(params, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Pseudo-Voigt + background on pixel rows ``yy`` x columns ``xx`` (1-D index arrays)."""
    amp, eta, bg = params[2], params[5], params[6]
    (gx, gy), (lx, ly) = _axes(params, np.ravel(yy), np.ravel(xx))[:2]
    return amp * (eta * np.outer(ly, lx) + (1.0 - eta) * np.outer(gy, gx)) + bg


def _jacobian(params, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """d model / d params, shape (pixels, 7), pixels in row-major order."""
    amp, eta = params[2], params[5]
    ((gx, gy), (lx, ly), (gx_c, gy_c), (lx_c, ly_c), (gx_f, gy_f), (lx_f, ly_f)) = _axes(
        params, yy, xx
    )
    lor, gau = np.outer(ly, lx), np.outer(gy, gx)
    # each column: amp * (eta * d(Ly Lx) + (1 - eta) * d(Gy Gx))
    a, b = amp * eta, amp * (1.0 - eta)
    jac = np.empty((N_PARAMS, len(yy), len(xx)))
    jac[0] = a * np.outer(ly, lx_c) + b * np.outer(gy, gx_c)
    jac[1] = a * np.outer(ly_c, lx) + b * np.outer(gy_c, gx)
    jac[2] = eta * lor + (1.0 - eta) * gau
    jac[3] = a * np.outer(ly, lx_f) + b * np.outer(gy, gx_f)
    jac[4] = a * np.outer(ly_f, lx) + b * np.outer(gy_f, gx)
    jac[5] = amp * (lor - gau)
    jac[6] = 1.0
    return jac.reshape(N_PARAMS, -1).T


def _initial_guess(data: np.ndarray) -> np.ndarray:
    """Background from the border median, centre from a 3x3 centroid about the maximum."""
    ny, nx = data.shape
    border = np.concatenate([data[0], data[-1], data[1:-1, 0], data[1:-1, -1]])
    bg = float(np.median(border))
    r, c = np.unravel_index(int(np.argmax(data)), data.shape)
    r0, r1, c0, c1 = max(r - 1, 0), min(r + 2, ny), max(c - 1, 0), min(c + 2, nx)
    w = np.clip(data[r0:r1, c0:c1] - bg, 0.0, None)
    total = float(w.sum())
    if total > 0:
        y = float((w.sum(axis=1) * np.arange(r0, r1)).sum()) / total
        x = float((w.sum(axis=0) * np.arange(c0, c1)).sum()) / total
    else:
        x, y = float(c), float(r)
    amp = max(float(data[r, c]) - bg, 1e-3)
    return np.array([x, y, amp, 2.0, 2.0, 0.3, bg])


def _failed(message: str, nfev: int = 0) -> FitResult:
    nan = float("nan")
    return FitResult(nan, nan, nan, nan, nan, nan, nan, False, message, nfev)


def _rejection(res, height: float, rms: float, nx: int, ny: int) -> str | None:
    """Why a converged-looking fit is not a peak, or None. Height against the residual:
    noise alone gives 3-5, real peaks 30+."""
    x0, y0, fx, fy = res.x[0], res.x[1], res.x[3], res.x[4]
    if res.status <= 0:
        return f"optimiser did not converge: {res.message}"
    if height < MIN_SNR * max(rms, 1e-12):
        return f"no significant peak (height {height / max(rms, 1e-12):.1f} x residual rms)"
    if not (0.0 <= x0 <= nx - 1 and 0.0 <= y0 <= ny - 1):
        return "centre in the patch's outer half-pixel (peak not in this patch)"
    if max(fx / nx, fy / ny) > 0.99:
        return "width at its upper bound (no compact peak)"
    return None


def fit_pseudo_voigt(patch: np.ndarray) -> FitResult:
    """Least-squares 2-D pseudo-Voigt + constant background fit of one patch.

    Never raises for a bad patch (flat, noise only, failed fit): ``success`` is False and
    ``message`` says why.  Raises ValueError for a patch that is not 2-D or holds NaN / inf.
    """
    data = np.asarray(patch, np.float64)
    if data.ndim != 2 or min(data.shape) < 3:
        raise ValueError(f"expected a 2-D patch of at least 3x3 pixels, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise ValueError(
            f"patch holds {int(np.count_nonzero(~np.isfinite(data)))} NaN or "
            "infinite values; mask or drop it before fitting"
        )
    lo, span = float(data.min()), float(np.ptp(data))
    if span <= 0.0:
        return _failed("flat patch: no peak to fit")
    norm = (data - lo) / span  # fit in 0..1 units for a well-conditioned problem
    ny, nx = norm.shape
    yy, xx = np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64)
    lower = np.array([-0.5, -0.5, 0.0, 0.5, 0.5, 0.0, -np.inf])
    upper = np.array([nx - 0.5, ny - 0.5, np.inf, float(nx), float(ny), 1.0, np.inf])
    p0 = np.clip(_initial_guess(norm), lower + 1e-6, upper - 1e-6)
    target = norm.ravel()
    try:
        res = least_squares(
            lambda p: _model(p, yy, xx).ravel() - target,
            p0,
            jac=lambda p: _jacobian(p, yy, xx),
            bounds=(lower, upper),
            method="trf",
            x_scale="jac",
            max_nfev=MAX_NFEV,
        )
    except (ValueError, np.linalg.LinAlgError) as exc:  # defensive: report, do not raise
        log.debug("pseudo-Voigt fit raised: %s", exc)
        return _failed(f"fit raised {type(exc).__name__}: {exc}")
    x0, y0, amp, fx, fy, eta, bg = res.x
    rms = math.sqrt(float(np.mean(res.fun**2)))
    # the brightest model pixel (not the continuous height, which a 0.5 px wide fit to one
    # noisy pixel inflates)
    height = float(np.max(res.fun + target)) - bg
    result = FitResult(
        float(x0),
        float(y0),
        float(amp * span),
        float(fx),
        float(fy),
        float(eta),
        float(bg * span + lo),
        True,
        res.message,
        int(res.nfev),
    )
    reason = _rejection(res, height, rms, nx, ny)
    if reason:
        result.success, result.message = False, reason
    return result


def fit_patches(patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit each patch: (centres (n, 2) as (x, y), NaN where failed; ok (n,) bool)."""
    stack = np.asarray(patches, np.float64)
    if stack.ndim != 3:
        raise ValueError(f"expected patches of shape (n, h, w), got {stack.shape}")
    bad = np.flatnonzero(~np.all(np.isfinite(stack), axis=(1, 2)))
    if bad.size:
        raise ValueError(f"patches {bad[:10].tolist()} hold NaN or infinite values")
    centres = np.full((len(stack), 2), np.nan)
    ok = np.zeros(len(stack), bool)
    for i, patch in enumerate(stack):
        fit = fit_pseudo_voigt(patch)
        if fit.success:
            centres[i] = fit.x, fit.y
            ok[i] = True
    log.debug("fitted %d of %d patches", int(ok.sum()), len(stack))
    return centres, ok
