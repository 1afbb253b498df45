"""Physics-informed training of PtychoNN (``train.loss = "physics"`` or ``"both"``): loss
terms that need no labels, only the measured frames, the probe and the scan positions.

- :func:`far_field`: the detector's forward model in torch (differentiable): |FFT| of
  probe x amplitude x exp(i phase), zero frequency at the centre, as the simulator makes
  frames and the edge's data residual (edge_pva/label_free.py) checks answers.
- :func:`amplitude_error`: per frame, the amplitude R-factor of the predicted moduli (their
  one unknown scale fitted in closed form: the input is normalised, the flux unknown)
  against the measured ones (the network's own input); for a phase object about the
  probe-weighted RMS phase error over sqrt 2, so it has the label loss's units.
- :func:`overlap_error`: neighbouring scan points see the same object where both are lit, so
  their predicted phases must agree there. Diffraction does not measure a frame's phase
  offset; this ties each frame's offset to its neighbours' (as an iterative reconstruction's
  shared object does) instead of leaving it to chance.
- :func:`partners`: each frame's nearest neighbour of its scan and the shift between them.
- :class:`TrainingLoss`: the loss ``train()`` minimises for a ``TrainConfig.loss``.
- :func:`training_set`: the inputs, targets and that loss for frames and their positions.
"""

from __future__ import annotations

import numpy as np
import torch

from edgeloop.config import TrainConfig
from edgeloop.optics import centring_sign, illuminated_mask
from edgeloop.remote.training import ptycho_loss

EPS = 1e-12


def far_field(shifted_probe: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor):
    """|far field| (B, N, N) of (B, N, N) amplitude and phase lit by the probe; the probe
    already multiplied by ``centring_sign`` (zero frequency to the centre)."""
    wave = torch.polar(amplitude, phase) * shifted_probe
    f = torch.view_as_real(torch.fft.fft2(wave))
    return torch.sqrt((f * f).sum(-1) + EPS)


def amplitude_error(predicted: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """(B,) R = sqrt(sum (s a - m)^2 / sum m^2) per frame, s the least-squares scale of the
    predicted moduli a against the measured m."""
    a, m = predicted.flatten(1), measured.flatten(1)
    s = (a * m).sum(1) / ((a * a).sum(1) + EPS)
    residual = ((s[:, None] * a - m) ** 2).sum(1)
    return torch.sqrt(residual / ((m * m).sum(1) + EPS) + EPS)


def overlap_error(
    phase_a: torch.Tensor, phase_b: torch.Tensor, shifts: torch.Tensor, lit: torch.Tensor
) -> torch.Tensor:
    """(B,) RMS difference of two frames' predicted phases (B, N, N) where both are lit;
    ``shifts`` (B, 2): frame b's position minus frame a's, whole pixels (row, col), so
    pixel (r, c) of a sees what pixel (r - dy, c - dx) of b sees. Frames that do not
    overlap give 0."""
    n = phase_a.shape[-1]
    out = []
    for pa, pb, (dy, dx) in zip(phase_a, phase_b, shifts.tolist(), strict=True):
        dy, dx = int(dy), int(dx)
        if abs(dy) >= n or abs(dx) >= n:
            out.append(pa.new_zeros(()))
            continue
        ra, rb = slice(max(dy, 0), n + min(dy, 0)), slice(max(-dy, 0), n - max(dy, 0))
        ca, cb = slice(max(dx, 0), n + min(dx, 0)), slice(max(-dx, 0), n - max(dx, 0))
        both = lit[ra, ca] & lit[rb, cb]
        if not bool(both.any()):
            out.append(pa.new_zeros(()))
            continue
        d = (pa[ra, ca] - pb[rb, cb])[both]
        out.append(torch.sqrt((d * d).mean() + EPS))
    return torch.stack(out)


def partners(positions_px: np.ndarray, scans: np.ndarray, max_shift: float) -> np.ndarray:
    """(n,) for each frame the nearest other frame of the same scan within ``max_shift``
    pixels (itself where there is none)."""
    positions_px = np.asarray(positions_px, np.float64)
    out = np.arange(len(positions_px))
    for scan in np.unique(scans):
        idx = np.flatnonzero(scans == scan)
        if len(idx) < 2:
            continue
        p = positions_px[idx]
        d = np.hypot(*(p[:, None, :] - p[None, :, :]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        nearest = d.argmin(1)
        close = d[np.arange(len(idx)), nearest] <= max_shift
        out[idx[close]] = idx[nearest[close]]
    return out


class TrainingLoss:
    """The loss of PtychoNN's training for ``loss`` = ``labels`` (the weighted MAE of
    amplitude and phase against the labels), ``physics`` (amplitude error, the overlap
    with ``overlap_weight``, plus a gauge: the batch's mean lit phase at 0 and its lit
    amplitude peaking near 1, the labels' conventions, which diffraction alone cannot fix)
    or ``both`` (labels + ``physics_weight`` x physics).

    Targets, per frame: the label amplitude and phase (``labels``/``both``), the measured
    moduli (the inputs), and the shift (row, col) to its partner. ``partners`` (n,): the
    frame each is paired with; with the overlap term, train() feeds every batch followed
    by its partners."""

    def __init__(
        self,
        loss: str,
        probe: np.ndarray,
        partners: np.ndarray | None,
        physics_weight: float = 1.0,
        overlap_weight: float = 0.0,
        lit_fraction: float = 0.1,
    ):
        if loss not in ("labels", "physics", "both"):
            raise ValueError(f"unknown training loss {loss!r}: labels, physics or both")
        self.loss = loss
        probe = np.asarray(probe, np.complex64)
        lit = illuminated_mask(probe, lit_fraction)
        self.lit = torch.from_numpy(lit)
        self.labels_term = ptycho_loss(lit.astype(np.float32), lit.shape)
        self.shifted_probe = torch.from_numpy(probe * centring_sign(probe.shape[0]))
        # pairs cost a second forward pass: only for the overlap term
        self.partners = partners if loss != "labels" and overlap_weight else None
        self.physics_weight, self.overlap_weight = physics_weight, overlap_weight

    def physics_term(self, pa, pp, moduli, shifts) -> torch.Tensor:
        total = amplitude_error(far_field(self.shifted_probe, pa, pp), moduli).mean()
        if self.partners is not None:
            half = len(pp) // 2  # the batch, then its partners
            overlap = overlap_error(pp[:half], pp[half:], shifts[:half], self.lit)
            total = total + self.overlap_weight * overlap.mean()
        if self.loss == "physics":  # squared: no pull once near the conventions
            lit_phase = pp[:, self.lit].mean()
            peak = pa[:, self.lit].amax(1)
            total = total + lit_phase**2 + ((peak - 1) ** 2).mean()
        return total

    def __call__(self, outputs, targets) -> torch.Tensor:
        if self.loss == "labels":
            return self.labels_term(outputs, targets[:2])
        moduli, shifts = targets[-2:]
        physics = self.physics_term(outputs[0][:, 0], outputs[1][:, 0], moduli, shifts)
        if self.loss == "physics":
            return physics
        return self.labels_term(outputs, targets[:2]) + self.physics_weight * physics


def training_set(
    inputs: np.ndarray,
    positions_px: np.ndarray,
    scans: np.ndarray,
    probe: np.ndarray,
    cfg: TrainConfig,
    labels: tuple = (),
) -> tuple[np.ndarray, tuple, TrainingLoss]:
    """(inputs, targets, loss) that ``train()`` minimises for ``cfg.loss`` (physics or
    both): the targets are ``labels`` (amplitude, phase: with ``both``), the measured
    moduli (the inputs) and each frame's shift to its partner, its nearest neighbour of the
    scan within half a frame."""
    pair = partners(positions_px, scans, max_shift=inputs.shape[-1] / 2)
    shifts = np.round(positions_px[pair] - positions_px).astype(np.float32)
    loss = TrainingLoss(cfg.loss, probe, pair, cfg.physics_weight, cfg.overlap_weight)
    return inputs, (*labels, inputs[:, 0], shifts), loss
