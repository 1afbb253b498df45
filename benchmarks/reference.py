"""How honest is the live reference error (remote/reference.py, ``$(P)ml:ReferenceError``)?

Ptychography, on the simulator: for windows of consecutive spiral points (several places in
the scan) and several LSQML epoch counts, the seconds one reference takes and the
reference's own phase error against the simulator's truth; then, on the window the service
would pick (``pick_windows``) with the default settings, the NN-versus-reference error of
the untrained network and of each PtychoNN in a registry, beside the network's true error.
HEDM: seconds, the pseudo-Voigt fits' own error against the simulator's peak centres, and
the NN-versus-fit error of an untrained BraggNN and of each BraggNN in a registry.

    python benchmarks/reference.py [--registry /tmp/ref_demo/models]
        [--hedm-registry /tmp/demo_hedm/models] [--threads 1] [--quick]

The registries come from ``edgeloop demo --out DIR`` (``DIR/models``; ``--mode hedm`` for
BraggNN).
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
import torch

from edgeloop.bluesky_plans.plans import spiral_positions
from edgeloop.config import Config
from edgeloop.ioc.hedm_sim import HedmSimulator
from edgeloop.ioc.physics import PtychoSimulator
from edgeloop.models import kind as model_kind
from edgeloop.optics import illuminated_mask
from edgeloop.peaks import peak_patches
from edgeloop.registry import Registry
from edgeloop.remote.peakfit import fit_patches
from edgeloop.remote.reference import (
    REF_EPOCHS,
    REF_WINDOW,
    hedm_reference,
    phase_errors,
    pick_windows,
    ptycho_reference,
    reference_phase,
)


def models(kind: str, registry: str | None, cfg: Config) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    out = {"untrained": model_kind(kind).build(**cfg.arch(kind))}
    if registry:
        reg = Registry(registry)
        for version in reg.versions():
            if reg.meta(version).get("kind") == kind:
                out[f"v{version}"], _ = reg.load(version, cfg.security)
    return out


def ptycho(args, cfg: Config) -> None:
    sim = PtychoSimulator(cfg.sim)
    spiral = spiral_positions(args.points, args.step, (0.2, -0.15))
    frames = np.stack([sim.frame(x, y) for x, y in spiral]).astype(np.float32)
    truth = np.stack([sim.true_phase(x, y) for x, y in spiral])
    mask = illuminated_mask(sim.probe)
    reference_phase(frames[:8], spiral[:8], cfg, epochs=1, threads=args.threads)  # import

    sizes = (20, 30) if args.quick else (20, 30, 40)
    epochs = (30, 200) if args.quick else (30, 100, 200)
    starts = [int(f * args.points) for f in (0.2, 0.5, 0.9)]
    print(
        f"Ptychography reference: {args.points}-point spiral, windows starting at {starts}, "
        f"LSQML, {args.threads} thread(s)"
    )
    print(
        f"{'frames':>6} {'epochs':>6} {'seconds':>8} {'ref error (rad)':>16} {'worst window':>13}"
    )
    for n in sizes:
        for ep in epochs:
            secs, errs = [], []
            for s in starts:
                w = slice(s, s + n)
                t0 = time.perf_counter()
                ref = reference_phase(frames[w], spiral[w], cfg, ep, threads=args.threads)
                secs.append(time.perf_counter() - t0)
                errs.append(phase_errors(ref, truth[w], mask).mean())
            print(f"{n:6d} {ep:6d} {np.mean(secs):8.2f} {np.mean(errs):16.4f} {max(errs):13.4f}")

    (window,) = pick_windows(args.points, window=REF_WINDOW)[:1]
    w = slice(window.start, window.stop)
    print(
        f"\nNN versus reference on the service's window (points {window.start}-"
        f"{window.stop - 1}, {REF_EPOCHS} epochs):"
    )
    print(f"{'model':>10} {'NN-vs-ref':>10} {'NN true':>8} {'ref true':>9} {'seconds':>8}")
    for name, model in models("ptychonn", args.registry, cfg).items():
        r = ptycho_reference(
            frames[w], spiral[w], model, cfg, threads=args.threads, truth=truth[w]
        )
        print(
            f"{name:>10} {r['reference_error']:10.4f} {r['nn_truth_error']:8.4f} "
            f"{r['reference_truth_error']:9.4f} {r['seconds']:8.2f}"
        )


def fit_truth_error(frames, truths, cfg: Config) -> tuple[float, int]:
    """The pseudo-Voigt fits' own error: mean distance (px) from each fitted, non-border,
    non-saturated peak to the nearest true centre (within 1.5 px; farther: an unmatched
    overlap, left out)."""
    dists = []
    for frame, truth in zip(frames, truths):
        peaks, patches, tops = peak_patches(
            frame,
            cfg.model.patch,
            sigma=cfg.edge.peak_sigma,
            min_separation=cfg.edge.peak_min_separation,
        )
        keep = ~(peaks.border | peaks.saturated)
        centres, ok = fit_patches(patches[keep])
        xy = centres[ok] + tops[keep][ok][:, ::-1]  # (x, y) detector pixels
        if len(truth) == 0 or len(xy) == 0:
            continue
        d = np.hypot(xy[:, None, 0] - truth["x"][None], xy[:, None, 1] - truth["y"][None])
        nearest = d.min(axis=1)
        dists.extend(nearest[nearest < 1.5])
    return float(np.mean(dists)), len(dists)


def hedm(args, cfg: Config) -> None:
    sim = HedmSimulator(cfg.hedm)
    shots = [sim.frame(omega) for omega in np.linspace(5, 355, args.hedm_frames)]
    frames, truths = [f for f, _ in shots], [t for _, t in shots]
    err, n = fit_truth_error(frames, truths, cfg)
    print(
        f"\nHEDM reference: {len(frames)} frames, at most {args.max_peaks} fits; "
        f"the fits' own error against the simulator: {err:.3f} px ({n} peaks)"
    )
    print(f"{'model':>10} {'NN-vs-fit px':>13} {'median':>7} {'peaks':>6} {'seconds':>8}")
    for name, model in models("braggnn", args.hedm_registry, cfg).items():
        r = hedm_reference(frames, model, cfg, max_peaks=args.max_peaks)
        print(
            f"{name:>10} {r['reference_error']:13.3f} {r['reference_error_median']:7.3f} "
            f"{r['peaks']:6d} {r['seconds']:8.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", help="PtychoNN registry (e.g. a demo's models/)")
    parser.add_argument("--hedm-registry", help="BraggNN registry (a `demo --mode hedm`'s)")
    parser.add_argument("--points", type=int, default=500, help="spiral points")
    parser.add_argument("--step", type=float, default=0.05, help="spiral step, um")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hedm-frames", type=int, default=4)
    parser.add_argument("--max-peaks", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="fewer window sizes / epochs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    cfg = Config()
    ptycho(args, cfg)
    hedm(args, cfg)


if __name__ == "__main__":
    main()
