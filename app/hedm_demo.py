"""``edgeloop demo --mode hedm``: rotation scan with an untrained BraggNN, retrain through a
PV write (pseudo-Voigt fit labels), rotation scan over angles not trained on, and report peak
centre errors against the simulator's truth, beside the conventional fit's."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from edgeloop.app.answers import PeakCollector
from edgeloop.app.hedm_accuracy import frame_errors
from edgeloop.app.loop import (
    burst,
    edge_stats,
    fly_figures,
    fly_line,
    retrain_via_pv,
)
from edgeloop.config import Config

log = logging.getLogger(__name__)


def scan_errors(tables: dict, scan: dict, sim) -> tuple[np.ndarray, int, int]:
    """Centre errors (px) of the scored truth peaks over a scan, found count, scored count."""
    errors, found, scored = [], 0, 0
    size = scan["frames"].shape[-1]
    for uid, omega in zip(scan["unique_id"], scan["omega_deg"]):
        t = tables.get(int(uid), {"x": np.zeros(0), "y": np.zeros(0)})
        d, f, n = frame_errors(t["x"], t["y"], sim.truth(float(omega)), size)
        errors.append(d)
        found, scored = found + f, scored + n
    return np.concatenate(errors) if errors else np.zeros(0), found, scored


def fit_scan(scan: dict, cfg: Config, sim, frames: int = 20) -> dict:
    """The conventional analysis on a scan's first ``frames`` frames: peak finder, then a
    pseudo-Voigt fit per patch, scored like the edge's answers and timed per peak."""
    from edgeloop.peaks import peak_patches
    from edgeloop.remote.peakfit import fit_patches

    errors, n_peaks, seconds = [], 0, 0.0
    for frame, omega in zip(scan["frames"][:frames], scan["omega_deg"][:frames]):
        _, patches, tops = peak_patches(
            frame,
            cfg.model.patch,
            sigma=cfg.edge.peak_sigma,
            min_separation=cfg.edge.peak_min_separation,
        )
        t0 = time.perf_counter()
        centres, ok = fit_patches(patches)
        seconds += time.perf_counter() - t0
        n_peaks += len(patches)
        x, y = tops[ok, 1] + centres[ok, 0], tops[ok, 0] + centres[ok, 1]
        errors.append(frame_errors(x, y, sim.truth(float(omega)), frame.shape[-1])[0])
    errors = np.concatenate(errors)
    return {"errors": errors[np.isfinite(errors)], "us_per_peak": seconds / max(n_peaks, 1) * 1e6}


def _stats(errors: np.ndarray) -> dict:
    if not len(errors):
        return {"mean": float("nan"), "p50": float("nan"), "p95": float("nan")}
    return {
        "mean": float(errors.mean()),
        "p50": float(np.percentile(errors, 50)),
        "p95": float(np.percentile(errors, 95)),
    }


def hedm_demo(cfg, out, ctx, RE, index, det, stage, frames: int, rate_hz: float) -> dict:
    from edgeloop.bluesky_plans import hedm_fly_scan, read_scan
    from edgeloop.ioc.hedm_sim import HedmSimulator

    p = cfg.prefix
    sim = HedmSimulator(cfg.hedm)
    collector = PeakCollector(ctx, f"{p}edge:Peaks")
    try:
        ranges = [(0.0, 30.0), (60.0, 90.0)]  # the second scan's angles are not trained on
        scans, tables, versions, seconds = [], [], [], []
        for i, (start, stop) in enumerate(ranges):
            if i == 1:
                retrain_s, states = retrain_via_pv(ctx, p, versions[0])
            log.info("rotation scan %d: %d frames %.0f..%.0f deg", i + 1, frames, start, stop)
            t0 = time.perf_counter()
            RE(hedm_fly_scan(det, stage, start, stop, frames, rate_hz, positions=cfg.positions))
            seconds.append(time.perf_counter() - t0)
            scans.append(read_scan(index.last_path))  # what the detector wrote
            tables.append(collector.take(scans[-1]["unique_id"], 60))
            versions.append(int(ctx.get(f"{p}edge:ModelVersion")["value"]))
        seen, burst_s = burst(ctx, p, 100, collector.take)
        stats = edge_stats(ctx, cfg)
    finally:
        collector.close()
    err1, _, _ = scan_errors(tables[0], scans[0], sim)
    err2, found, scored = scan_errors(tables[1], scans[1], sim)
    fit = fit_scan(scans[1], cfg, sim)
    peaks = [len(t["x"]) for t in tables[1].values()]
    stamps = []  # of the scans' own frames (not the one that primed the file plugin)
    for ts, scan in zip(tables, scans):
        uids = set(scan["unique_id"].tolist())
        stamps.append([t["stamps"] for u, t in ts.items() if u in uids])
    _save_png(out / "hedm_peaks.png", scans[1], tables[1], sim, cfg, versions[1])
    return {
        "mode": "hedm",
        "frames_in": stats["FramesIn"],
        "frames_out": stats["FramesOut"],
        "dropped": stats["Dropped"],
        "bad_frames": stats["BadFrames"],
        "fps": seen / burst_s,
        "frames_per_scan": frames,
        "scan_fps": 2 * frames / sum(seconds),
        "fly": fly_figures(2 * frames, stamps, rate_hz),
        "peaks_per_frame": float(np.mean(peaks)) if peaks else 0.0,
        "model_versions": versions,
        "error_px_before": _stats(err1),
        "error_px_after": _stats(err2),
        "fit_error_px": _stats(fit["errors"]),
        "fit_us_per_peak": fit["us_per_peak"],
        "found_after": found,
        "scored_after": scored,
        "error_unit": "px, distance to the true centre of strong isolated peaks",
        "retrain_s": retrain_s,
        "retrain_states": states,
    }


def _save_png(path: Path, scan: dict, tables: dict, sim, cfg: Config, version: int) -> None:
    """One frame: the whole detector with the true centres, and close-ups of three peaks
    with the true (o), fitted (x) and edge-predicted (+) centres."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeloop.peaks import peak_patches
    from edgeloop.remote.peakfit import fit_patches

    counts = [len(tables.get(int(u), {"x": []})["x"]) for u in scan["unique_id"]]
    k = int(np.argmax(counts))
    frame, uid = scan["frames"][k].astype(float), int(scan["unique_id"][k])
    truth = sim.truth(float(scan["omega_deg"][k]))
    table = tables.get(uid, {"x": np.zeros(0), "y": np.zeros(0)})
    _, patches, tops = peak_patches(
        frame,
        cfg.model.patch,
        sigma=cfg.edge.peak_sigma,
        min_separation=cfg.edge.peak_min_separation,
    )
    centres, ok = fit_patches(patches)
    fx, fy = tops[ok, 1] + centres[ok, 0], tops[ok, 0] + centres[ok, 1]
    strong = np.argsort(-truth["height"])[:3]

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.6), gridspec_kw={"width_ratios": [1.6, 1, 1, 1]})
    shown = np.log10(np.maximum(frame, 1))
    axes[0].imshow(
        shown, cmap="magma", vmin=np.percentile(shown, 50), vmax=np.percentile(shown, 99.95)
    )
    axes[0].scatter(truth["x"], truth["y"], s=60, facecolors="none", edgecolors="c", lw=0.8)
    axes[0].set_title(
        f"frame uniqueId {uid}, omega {scan['omega_deg'][k]:.2f} deg "
        f"(log counts)\n{len(truth)} lit reflections (cyan), "
        f"{len(table['x'])} peaks on edge:Peaks"
    )
    half = 7
    for ax, i in zip(axes[1:], strong):
        cx, cy = int(round(truth["x"][i])), int(round(truth["y"][i]))
        ax.imshow(
            frame, cmap="magma", extent=(-0.5, frame.shape[1] - 0.5, frame.shape[0] - 0.5, -0.5)
        )
        ax.set_xlim(cx - half, cx + half)
        ax.set_ylim(cy + half, cy - half)
        ax.plot(truth["x"], truth["y"], "o", mfc="none", mec="c", ms=14, mew=2, label="truth")
        ax.plot(fx, fy, "x", c="w", ms=11, mew=2, label="pseudo-Voigt fit")
        ax.plot(
            table["x"], table["y"], "+", c="lime", ms=14, mew=2, label=f"BraggNN v{version} (edge)"
        )
        ax.set_title(f"peak at ({truth['x'][i]:.2f}, {truth['y'][i]:.2f})")
    axes[1].legend(loc="lower left", fontsize=8, framealpha=0.6)
    fig.suptitle("edgeloop HEDM: Bragg peak centres, truth vs fit vs edge")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def print_report(r: dict, out: Path) -> None:
    b, a, f = r["error_px_before"], r["error_px_after"], r["fit_error_px"]
    lines = [
        "edgeloop demo report (HEDM)",
        f"  frames in / out / dropped   {r['frames_in']} / {r['frames_out']} / {r['dropped']}",
        f"  edge throughput (burst)     {r['fps']:.1f} frames/s   ({r['peaks_per_frame']:.1f} "
        "peaks per frame)",
        fly_line(r["fly"]),
        f"  model versions              {r['model_versions']}",
        f"  centre error before         mean {b['mean']:.3f}  p95 {b['p95']:.3f} px "
        "(untrained BraggNN)",
        f"  centre error after          mean {a['mean']:.3f}  p95 {a['p95']:.3f} px "
        f"({r['found_after']}/{r['scored_after']} found within 2 px)",
        f"  pseudo-Voigt fit            mean {f['mean']:.3f}  p95 {f['p95']:.3f} px, "
        f"{r['fit_us_per_peak']:.0f} us per peak",
        f"  retraining (PV write -> new model serving)  {r['retrain_s']:.0f} s",
        f"  report {out / 'report.json'}, picture {out / 'hedm_peaks.png'}",
    ]
    print("\n".join(lines), flush=True)
