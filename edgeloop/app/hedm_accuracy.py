"""``edgeloop hedm-accuracy``: BraggNN against pseudo-Voigt fitting on a fresh simulated set.

BraggNN is trained here as the loop would train it: on patches labelled by the pseudo-Voigt
fit (the conventional analysis), never on the simulator's truth. Both are then scored against
the truth on a fresh set, and timed per peak on this machine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from edgeloop.config import Config
from edgeloop.edge_pva.inference import BACKENDS, ServedModel, make_backend
from edgeloop.ioc.hedm import make_patch_dataset
from edgeloop.models import BraggNN, braggnn_preprocess
from edgeloop.models import kind as model_kind
from edgeloop.remote.peakfit import fit_patches
from edgeloop.remote.training import centre_loss, train

log = logging.getLogger(__name__)


def _errors(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.linalg.norm(pred - truth, axis=1)


def frame_errors(
    x: np.ndarray,
    y: np.ndarray,
    truth: np.ndarray,
    frame_size: int,
    min_height: float = 300.0,
    isolation_px: float = 8.0,
    found_px: float = 2.0,
) -> tuple[np.ndarray, int, int]:
    """Score one frame's reported peaks against the simulator's truth.

    Scored: strong (height >= min_height), unsaturated truth peaks at least 6 px inside the
    frame and ``isolation_px`` from any other lit peak, where one centre can be told.
    Returns (distance to the nearest reported peak for each scored truth peak, number of
    those within ``found_px``, number scored).
    """
    tx, ty = truth["x"], truth["y"]
    others = np.hypot(tx[:, None] - tx[None], ty[:, None] - ty[None])
    np.fill_diagonal(others, np.inf)
    lo, hi = 6, frame_size - 7
    scored = (
        (truth["height"] >= min_height)
        & ~truth["saturated"]
        & (others.min(axis=1, initial=np.inf) > isolation_px)
        & (tx >= lo)
        & (tx <= hi)
        & (ty >= lo)
        & (ty <= hi)
    )
    if not scored.any():
        return np.zeros(0), 0, 0
    if len(x) == 0:
        return np.full(int(scored.sum()), np.inf), 0, int(scored.sum())
    d = np.hypot(np.asarray(x)[None] - tx[scored, None], np.asarray(y)[None] - ty[scored, None])
    nearest = d.min(axis=1)
    return nearest, int((nearest < found_px).sum()), int(scored.sum())


def braggnn_predict(infer, patches: np.ndarray, batch: int = 64) -> tuple[np.ndarray, float]:
    """Centres (x, y) in patch pixels and the seconds it took (preprocessing included);
    ``infer`` is a served model's ``infer`` (preprocessing + backend)."""
    size = patches.shape[-1]
    out = []
    t0 = time.perf_counter()
    for start in range(0, len(patches), batch):
        (centre,) = infer(patches[start : start + batch])
        out.append(np.asarray(centre) * size)
    return np.concatenate(out), time.perf_counter() - t0


def run(
    out: str | Path,
    n_train: int = 20000,
    n_test: int = 1000,
    epochs: int = 20,
    patch: int = 11,
    threads: int = 1,
    width: int | None = None,
) -> dict:
    """Train on fit labels, score and time on fresh peaks.  Both sides get ``threads`` CPU
    threads (the fit is single-threaded; 1 keeps the per-peak comparison per core)."""
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_patches, _ = make_patch_dataset(n_train, patch, seed=101)
    t0 = time.perf_counter()
    labels, ok = fit_patches(train_patches)
    label_s = time.perf_counter() - t0
    log.info(
        "labelled %d/%d training patches by pseudo-Voigt fit in %.1f s", ok.sum(), n_train, label_s
    )
    inputs = braggnn_preprocess(train_patches[ok], patch)
    torch.manual_seed(0)
    cfg = dataclasses.replace(Config().train_hedm, epochs=epochs, threads=threads)
    t0 = time.perf_counter()
    width = width or Config().model.braggnn_width
    model, val_loss, _ = train(
        BraggNN(patch, width), inputs, (labels[ok] / patch,), centre_loss, cfg
    )
    train_s = time.perf_counter() - t0

    test_patches, truth = make_patch_dataset(n_test, patch, seed=202)
    timings, preds = {}, {}
    for name in BACKENDS:  # same weights, each installed backend timed in this run
        try:
            backend = make_backend(name, model, patch, threads)
        except ImportError as exc:
            log.warning("backend %s left out: %s", name, exc)
            continue
        served = ServedModel(0, model_kind("braggnn"), patch, backend)
        braggnn_predict(served.infer, test_patches[:64])  # warm-up
        preds[name], timings[name] = braggnn_predict(served.infer, test_patches)
    fastest = min(timings, key=timings.get)
    pred, nn_s = preds[fastest], timings[fastest]
    t0 = time.perf_counter()
    fitted, fit_ok = fit_patches(test_patches)
    fit_s = time.perf_counter() - t0
    nn_err = _errors(pred[fit_ok], truth[fit_ok])  # both scored on the same peaks
    fit_err = _errors(fitted[fit_ok], truth[fit_ok])
    report = {
        "n_peaks": int(n_test),
        "n_fit_ok": int(fit_ok.sum()),
        "n_train": int(ok.sum()),
        "braggnn_error_px_mean": float(nn_err.mean()),
        "braggnn_error_px_p50": float(np.percentile(nn_err, 50)),
        "braggnn_error_px_p95": float(np.percentile(nn_err, 95)),
        "fit_error_px_mean": float(fit_err.mean()),
        "fit_error_px_p50": float(np.percentile(fit_err, 50)),
        "fit_error_px_p95": float(np.percentile(fit_err, 95)),
        "braggnn_us_per_peak": nn_s / n_test * 1e6,
        "braggnn_backend": fastest,
        "braggnn_us_per_peak_by_backend": {k: v / n_test * 1e6 for k, v in timings.items()},
        "fit_us_per_peak": fit_s / n_test * 1e6,
        "speedup": fit_s / nn_s,
        "error_ratio": float(nn_err.mean() / fit_err.mean()),
        "val_loss": val_loss,
        "threads": threads,
        "batch": 64,
        "width": width,
        "label_s": label_s,
        "train_s": train_s,
        "epochs": epochs,
    }
    (out / "accuracy.json").write_text(json.dumps(report, indent=2))
    backends = ", ".join(
        f"{k} {v:.0f} us" for k, v in report["braggnn_us_per_peak_by_backend"].items()
    )
    print(
        f"BraggNN vs pseudo-Voigt fit on {n_test} fresh simulated peaks "
        f"({threads} CPU thread(s) each; BraggNN width {width} trained on "
        f"{report['n_train']} fit labels)\n"
        f"  centre error mean/p50/p95 px  BraggNN {report['braggnn_error_px_mean']:.3f} / "
        f"{report['braggnn_error_px_p50']:.3f} / {report['braggnn_error_px_p95']:.3f}   "
        f"fit {report['fit_error_px_mean']:.3f} / {report['fit_error_px_p50']:.3f} / "
        f"{report['fit_error_px_p95']:.3f}   (ratio {report['error_ratio']:.2f})\n"
        f"  time per peak                 BraggNN {report['braggnn_us_per_peak']:.1f} us "
        f"({backends})   fit {report['fit_us_per_peak']:.0f} us   "
        f"({report['speedup']:.0f}x)\n"
        f"  written {out / 'accuracy.json'}",
        flush=True,
    )
    return report
