"""The live reference error (``$(P)ml:ReferenceError``): on a few percent of a running scan
the conventional analysis is run in the background and the network's answer for the same
frames is compared with it, so the operator sees an honest error during the experiment.

Pure functions; the service samples the frames (:func:`pick_windows`), runs
:func:`ptycho_reference` or :func:`hedm_reference` off the edge's path and publishes
``reference_error``.

Ptychography: phase retrieval (ptychi LSQML via :func:`edgeloop.remote.labels.make_labels`)
on a window of consecutive scan points, the network on the same frames; the error is the
mean over frames of mean |NN phase - reference phase| inside the illuminated region after
removing each frame's offset (the global phase is not measurable), the definition of the
demo's true phase error.  Measured on the simulator (``benchmarks/reference.py``): a window
of 30 frames and 200 LSQML epochs takes about 5 s on one thread (3.5 s on two idle cores)
and the reference itself is within about 0.01 rad of the truth (0.02 rad at the outer rings
of a 963-point spiral), a fifth of a trained network's error (about 0.05 rad); 30 epochs,
the labels' default, leaves 0.04 rad, nearly as large as the error being measured.  The
first call also pays for importing ptychi (about 4 s).

HEDM: Bragg peaks of a few frames, a pseudo-Voigt fit of some of them
(:func:`edgeloop.remote.peakfit.fit_patches`), BraggNN on the same patches; the error is the
mean distance in pixels between the two centres.  Border and saturated peaks and failed fits
are left out, as in the labels.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from edgeloop.config import Config
from edgeloop.models import kind as model_kind
from edgeloop.optics import illuminated_mask, make_probe

# Phase retrieval on a window: fewer than ~30 consecutive points of a Fermat spiral (a thin
# ring, since consecutive points are 137.5 degrees apart) overlap too little, and below
# ~200 LSQML epochs the reference is not converged (benchmarks/reference.py).
REF_WINDOW = 30
REF_EPOCHS = 200
REF_ALGORITHM = "LSQML"  # rPIE / ePIE (make_labels, ptychi 2.2) gave ~1.6 rad or NaN here
REF_FRACTION = 0.03
REF_THREADS = 1  # two threads: 3.5 s instead of 5 on idle cores, ten times slower on busy ones
MIN_WINDOW = 20  # a scan shorter than this gets no reference
HEDM_MAX_PEAKS = 100  # pseudo-Voigt fits per reference (about 4 ms each)


def pick_windows(
    n_total: int,
    fraction: float = REF_FRACTION,
    window: int = REF_WINDOW,
    min_frames: int = MIN_WINDOW,
) -> list[range]:
    """Which scan points (indices 0 .. n_total-1) the reference analyses: ``k`` windows of
    ``window`` consecutive points, ``k = max(1, round(fraction * n_total / window))``, each
    centred in one of ``k`` equal parts of the scan (so the first answer comes while the scan
    runs, and long scans are sampled along their length).

    A window is never shorter than ``window`` (phase retrieval needs overlapping frames), so a
    short scan uses more than ``fraction``: 500 points give one window of 30 (6 %), 963 one
    (3 %), 2000 two (3 %).  A scan shorter than ``window`` is analysed whole if it has at
    least ``min_frames`` points, else not at all (an empty list).  Windows are in scan order
    and do not overlap; ``i in w`` tells whether point ``i`` belongs to window ``w``.
    """
    if n_total < 0 or window < 1 or min_frames < 1 or not 0 < fraction <= 1:
        raise ValueError(
            f"need n_total >= 0, window >= 1, min_frames >= 1, 0 < fraction <= 1; got "
            f"{n_total}, {window}, {min_frames}, {fraction}"
        )
    if n_total < window:
        return [range(n_total)] if n_total >= min_frames else []
    k = max(1, min(round(fraction * n_total / window), n_total // window))
    part = n_total / k  # at least ``window``: the windows never overlap
    windows = []
    for i in range(k):
        start = min(max(round((i + 0.5) * part - window / 2), 0), n_total - window)
        windows.append(range(start, start + window))
    return windows


def phase_errors(phase: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per frame, mean |phase - reference| inside ``mask`` after removing the frame's mean
    difference (the global phase is not measurable); phases (N, M, M), mask (M, M)."""
    d = (np.asarray(phase, np.float64) - np.asarray(reference, np.float64))[:, mask]
    return np.abs(d - d.mean(axis=1, keepdims=True)).mean(axis=1)


def _run(model: nn.Module, inputs: np.ndarray) -> tuple[np.ndarray, ...]:
    """The model's outputs for one batch, in eval mode (its mode is restored after)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(torch.from_numpy(np.ascontiguousarray(inputs, np.float32)).to(device))
    finally:
        model.train(was_training)
    return tuple(o.float().cpu().numpy() for o in out)


def predict_phase(model: nn.Module, frames: np.ndarray, cfg: Config) -> np.ndarray:
    """PtychoNN's phase (N, S, S) for frames (N, M, M), preprocessed as the edge does."""
    spec = model_kind("ptychonn")
    _, phase = _run(model, spec.preprocess(list(frames), cfg.model.input_size))
    return phase[:, 0]


def reference_phase(
    frames: np.ndarray,
    positions_um: np.ndarray,
    cfg: Config,
    epochs: int = REF_EPOCHS,
    algorithm: str = REF_ALGORITHM,
    threads: int = REF_THREADS,
) -> np.ndarray:
    """Phase retrieval on the window: the reconstructed phase each frame saw (N, M, M).

    Note ptychi sets torch's thread count for the whole process (``threads``).
    """
    from edgeloop.remote.labels import make_labels  # imports ptychi (seconds) on first use

    m = frames.shape[-1]
    probe = make_probe(m, cfg.sim.probe_radius_px, cfg.sim.probe_defocus)
    _, phase = make_labels(
        np.asarray(frames, np.float32),
        np.asarray(positions_um, np.float64),
        cfg.sim.pixel_um,
        probe,
        epochs,
        algorithm,
        threads,
    )
    return phase


def ptycho_reference(
    frames: np.ndarray,
    positions_um: np.ndarray,
    model: nn.Module,
    cfg: Config,
    epochs: int = REF_EPOCHS,
    algorithm: str = REF_ALGORITHM,
    threads: int = REF_THREADS,
    truth: np.ndarray | None = None,
) -> dict:
    """NN-versus-reference phase error on a window of consecutive scan points.

    frames (N, M, M) as the detector gives them (zero frequency at the centre), positions_um
    (N, 2) as (x, y); ``model`` a PtychoNN taking ``cfg.model.input_size`` (which must be M:
    the reference is cut at the frame size).  Frames or positions holding NaN/Inf are left
    out (``skipped``).  ``truth`` (N, M, M), the true phase where it is known (simulator),
    adds the reference's own error and the network's true error.

    Returns reference_error (rad, mean over frames), reference_error_max (worst frame),
    frames, skipped, seconds (all), reconstruction_seconds, epochs, algorithm, and with
    truth: reference_truth_error, nn_truth_error (rad).
    """
    t0 = time.perf_counter()
    frames = np.asarray(frames)
    positions_um = np.asarray(positions_um, np.float64)
    if frames.ndim != 3 or positions_um.shape != (len(frames), 2):
        raise ValueError(
            f"expected frames (N, M, M) and positions (N, 2); got {frames.shape}, "
            f"{positions_um.shape}"
        )
    m = frames.shape[-1]
    if m != cfg.model.input_size:
        raise ValueError(
            f"frames are {m} px but the network takes {cfg.model.input_size} px: the "
            "reference phase is cut at the frame size"
        )
    ok = np.isfinite(frames.reshape(len(frames), -1)).all(axis=1)
    ok &= np.isfinite(positions_um).all(axis=1)
    frames, positions_um = frames[ok].astype(np.float32), positions_um[ok]
    t1 = time.perf_counter()
    ref = reference_phase(frames, positions_um, cfg, epochs, algorithm, threads)
    recon_s = time.perf_counter() - t1
    nn_phase = predict_phase(model, frames, cfg)
    mask = illuminated_mask(make_probe(m, cfg.sim.probe_radius_px, cfg.sim.probe_defocus))
    errs = phase_errors(nn_phase, ref, mask)
    result = {
        "reference_error": float(errs.mean()),
        "reference_error_max": float(errs.max()),
        "frames": int(len(frames)),
        "skipped": int((~ok).sum()),
        "epochs": int(epochs),
        "algorithm": algorithm,
        "reconstruction_seconds": recon_s,
    }
    if truth is not None:
        truth = np.asarray(truth)[ok]
        result["reference_truth_error"] = float(phase_errors(ref, truth, mask).mean())
        result["nn_truth_error"] = float(phase_errors(nn_phase, truth, mask).mean())
    result["seconds"] = time.perf_counter() - t0
    return result


def hedm_reference(
    frames,
    model: nn.Module,
    cfg: Config,
    max_peaks: int = HEDM_MAX_PEAKS,
    seed: int = 0,
) -> dict:
    """NN-versus-fit peak centres, in detector pixels, on a few HEDM frames.

    Peaks are found as the edge finds them (``cfg.edge.peak_sigma``, ``peak_min_separation``,
    ``cfg.model.patch``); border and saturated peaks are left out; of the rest at most
    ``max_peaks``, drawn at random (``seed``) so bright and faint peaks are represented as
    the edge sees them, are fitted with a pseudo-Voigt; failed fits are left out.

    Returns reference_error (px, mean distance), reference_error_median, peaks (compared),
    candidates (peaks found), fit_failed, frames, skipped (frames holding NaN/Inf),
    seconds, and offset (mean NN - fit, (x, y) px: a systematic bias shows here).
    """
    from edgeloop.peaks import peak_patches
    from edgeloop.remote.peakfit import fit_patches

    t0 = time.perf_counter()
    size = cfg.model.patch
    kept, found, skipped = [], 0, 0
    for frame in frames:
        frame = np.asarray(frame)
        if frame.ndim != 2:
            raise ValueError(f"expected 2-D frames, got shape {frame.shape}")
        if not np.isfinite(frame).all():
            skipped += 1
            continue
        peaks, patches, _ = peak_patches(
            frame,
            size,
            sigma=cfg.edge.peak_sigma,
            min_separation=cfg.edge.peak_min_separation,
            max_peaks=cfg.edge.max_peaks_per_frame,
        )
        found += len(patches)
        kept.append(patches[~(peaks.border | peaks.saturated)])
    patches = np.concatenate(kept) if kept else np.zeros((0, size, size), np.float32)
    if len(patches) > max_peaks:
        pick = np.random.default_rng(seed).choice(len(patches), max_peaks, replace=False)
        patches = patches[np.sort(pick)]
    fit, ok = fit_patches(patches)
    result = {
        "peaks": int(ok.sum()),
        "candidates": found,
        "fit_failed": int((~ok).sum()),
        "frames": len(kept),
        "skipped": skipped,
    }
    if ok.any():
        (centre,) = _run(model, model_kind("braggnn").preprocess(patches[ok], size))
        diff = centre.astype(np.float64) * size - fit[ok]  # (x, y) patch pixels
        dist = np.hypot(diff[:, 0], diff[:, 1])
        result.update(
            reference_error=float(dist.mean()),
            reference_error_median=float(np.median(dist)),
            offset=(float(diff[:, 0].mean()), float(diff[:, 1].mean())),
        )
    else:
        nan = math.nan
        result.update(reference_error=nan, reference_error_median=nan, offset=(nan, nan))
    result["seconds"] = time.perf_counter() - t0
    return result


__all__ = [
    "REF_WINDOW",
    "REF_EPOCHS",
    "REF_FRACTION",
    "pick_windows",
    "phase_errors",
    "predict_phase",
    "reference_phase",
    "ptycho_reference",
    "hedm_reference",
]
