"""HEDM: does the edge's label-free figure follow BraggNN's true error, across peaks, frames
and models?

Renders simulated HEDM frames over a rotation and answers each as the edge does
(``locate_peaks``: peak finder, 11x11 patches, BraggNN).  Per peak it records the label-free
figure (the distance of BraggNN's centre from the patch's background-subtracted centroid,
``edge_pva.label_free.centroid_distance``; its mean over a frame's peaks is what
``edge:Consistency`` carries in HEDM mode) beside the true error (the distance of BraggNN's
centre from the simulated reflection nearest the finder's maximum; candidates with none
within 2 px are left out).  Prints per model the means and the Spearman rank correlation
across its peaks and frames, then across the peaks and frames of all models pooled and across
the models' means, and the cost per frame.

The models: the untrained v0 (seed 0, as the edge serves it), every braggnn version in
``--registry`` (e.g. a ``demo --mode hedm`` run's ``models/``), with ``--graded 1,3,10``
BraggNNs trained here for that many epochs on isolated simulated peaks' true centres, and with
``--fit-epochs N`` one trained as the loop trains it, on pseudo-Voigt fit labels.

    python benchmarks/hedm_consistency.py [--registry out/hedm/models] [--graded 1,3,10,30]
        [--frames 60]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import numpy as np
import torch
from consistency import _rho  # beside this script
from scipy.spatial import cKDTree

from edgeloop.config import Config
from edgeloop.edge_pva.inference import ServedModel, make_backend
from edgeloop.edge_pva.label_free import centroid_distance
from edgeloop.edge_pva.peak_tables import locate_peaks
from edgeloop.ioc.hedm_sim import HedmSimulator, make_patch_dataset
from edgeloop.models import braggnn_preprocess
from edgeloop.models import kind as model_kind
from edgeloop.peaks import find_peaks
from edgeloop.registry import Registry

MATCH_PX = 2.0


def scan(served: ServedModel, cfg: Config, omegas) -> dict:
    """Per matched peak: figure, true error, frame index; per frame: the figure's seconds
    and the number of peaks."""
    sim = HedmSimulator(cfg.hedm)  # the same frames (and noise) for every model
    edge, patch = cfg.edge, cfg.model.patch
    figure, error, frame_of, seconds, counts = [], [], [], [], []
    for i, omega in enumerate(omegas):
        frame, truth = sim.frame(omega)
        peaks, patches, _ = locate_peaks(
            frame,
            served.infer,
            patch,
            sigma=edge.peak_sigma,
            min_separation=edge.peak_min_separation,
            max_peaks=edge.max_peaks_per_frame,
        )
        if not len(patches) or not len(truth):
            continue
        t0 = time.perf_counter()  # the figure again, timed alone
        centroid_distance(patches, np.full((len(patches), 2), patch / 2))
        seconds.append(time.perf_counter() - t0)
        counts.append(len(patches))
        # each candidate is matched by the finder's maximum (not BraggNN's answer, which an
        # untrained model puts anywhere) to the nearest simulated reflection within 2 px
        found = find_peaks(
            frame,
            sigma=edge.peak_sigma,
            min_separation=edge.peak_min_separation,
            max_peaks=edge.max_peaks_per_frame,
        )
        tree = cKDTree(np.stack([truth["x"], truth["y"]], 1))
        near, j = tree.query(np.stack([found.cols, found.rows], 1))
        d = np.hypot(peaks["x"] - truth["x"][j], peaks["y"] - truth["y"][j])
        ok = (near < MATCH_PX) & np.isfinite(peaks["offset"])
        figure.extend(peaks["offset"][ok])
        error.extend(d[ok])
        frame_of.extend([i] * int(ok.sum()))
    return {
        "figure": np.array(figure),
        "error": np.array(error),
        "frame": np.array(frame_of),
        "seconds": np.array(seconds),
        "peaks": np.array(counts),
    }


def per_frame(r: dict) -> dict:
    frames = np.unique(r["frame"])
    return {
        k: np.array([r[k][r["frame"] == f].mean() for f in frames]) for k in ("figure", "error")
    }


def graded_models(cfg: Config, epochs: list[int], n_peaks: int) -> dict:
    """BraggNNs after each of ``epochs`` epochs of one run on isolated peaks' true centres."""
    from edgeloop.remote.training import centre_loss, train  # benchmarks may use remote/

    patch = cfg.model.patch
    patches, centres = make_patch_dataset(n_peaks, patch, seed=303, cfg=cfg.hedm)
    torch.manual_seed(1)
    model = model_kind("braggnn").build(**cfg.arch("braggnn"))
    snapshots = {}

    def progress(epoch, _total, _val):
        if epoch in epochs:
            snapshots[f"e{epoch}"] = copy.deepcopy(model).eval()

    tcfg = dataclasses.replace(cfg.train_hedm, epochs=max(epochs), threads=1)
    t0 = time.perf_counter()
    inputs = braggnn_preprocess(patches, patch)
    train(model, inputs, (centres / patch,), centre_loss, tcfg, progress)
    print(f"trained {max(epochs)} epochs on {n_peaks} peaks in {time.perf_counter() - t0:.0f} s")
    return snapshots


def fit_label_model(cfg: Config, epochs: int, n_peaks: int) -> torch.nn.Module:
    """A BraggNN trained as the loop trains it: on pseudo-Voigt fit labels."""
    from edgeloop.remote.peakfit import fit_patches
    from edgeloop.remote.training import centre_loss, train

    patch = cfg.model.patch
    patches, _ = make_patch_dataset(n_peaks, patch, seed=404, cfg=cfg.hedm)
    labels, ok = fit_patches(patches)
    torch.manual_seed(2)
    model = model_kind("braggnn").build(**cfg.arch("braggnn"))
    tcfg = dataclasses.replace(cfg.train_hedm, epochs=epochs, threads=1)
    inputs = braggnn_preprocess(patches[ok], patch)
    model, _, _ = train(model, inputs, (labels[ok] / patch,), centre_loss, tcfg)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default=None, help="a model registry (e.g. a demo's)")
    parser.add_argument("--graded", default="", help="epochs of models trained here: 1,3,10")
    parser.add_argument("--train-peaks", type=int, default=4000)
    parser.add_argument(
        "--fit-epochs", type=int, default=0, help="also a BraggNN trained on fit labels"
    )
    parser.add_argument("--frames", type=int, default=60)
    args = parser.parse_args()

    cfg = Config()
    torch.set_num_threads(1)
    omegas = np.linspace(0.0, 360.0, args.frames, endpoint=False) + 0.37
    torch.manual_seed(0)  # v0 as the edge serves it
    models = {"v0": model_kind("braggnn").build(**cfg.arch("braggnn"))}
    if args.graded:
        epochs = sorted(int(e) for e in args.graded.split(","))
        models.update(graded_models(cfg, epochs, args.train_peaks))
    if args.fit_epochs:
        models[f"fit{args.fit_epochs}"] = fit_label_model(cfg, args.fit_epochs, args.train_peaks)
    if args.registry:
        reg = Registry(args.registry)
        for version in sorted(reg.ranked("braggnn")):
            models[f"v{version}"], _ = reg.load(version, cfg.security)
    spec, patch = model_kind("braggnn"), cfg.model.patch
    rows = []
    for name, model in models.items():
        served = ServedModel(0, spec, patch, make_backend("torch", model.eval(), patch))
        r = scan(served, cfg, omegas)
        rows.append((name, r, per_frame(r)))
    print(
        f"{'model':>8} {'peaks':>6} {'true err':>9} {'figure':>8} {'rho peaks':>10} "
        f"{'rho frames':>11}   (px)"
    )
    for name, r, f in rows:
        print(
            f"{name:>8} {len(r['error']):6d} {r['error'].mean():9.3f} {r['figure'].mean():8.3f} "
            f"{_rho(r['figure'], r['error']):10.2f} {_rho(f['figure'], f['error']):11.2f}"
        )
    peaks = {k: np.concatenate([r[k] for _, r, _ in rows]) for k in ("figure", "error")}
    frames = {k: np.concatenate([f[k] for _, _, f in rows]) for k in ("figure", "error")}
    print(
        f"Spearman rho pooled over all models: peaks {_rho(peaks['figure'], peaks['error']):.3f}"
        f" (n={len(peaks['error'])}), frames {_rho(frames['figure'], frames['error']):.3f} "
        f"(n={len(frames['error'])})"
    )
    if len(rows) > 2:
        across = _rho(
            [r["figure"].mean() for _, r, _ in rows], [r["error"].mean() for _, r, _ in rows]
        )
        print(f"Spearman rho across the {len(rows)} models' means: {across:.3f}")
    secs = np.concatenate([r["seconds"] for _, r, _ in rows])
    n = np.concatenate([r["peaks"] for _, r, _ in rows])
    print(
        f"figure: {np.median(secs) * 1e6:.0f} us/frame median, {n.mean():.1f} peaks/frame "
        f"({secs.sum() / n.sum() * 1e6:.1f} us/peak)"
    )


if __name__ == "__main__":
    main()
