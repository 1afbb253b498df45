"""``edgeloop demo`` for ptychography (app layer): a spiral scan with the untrained PtychoNN,
retraining through a PV write, a second scan with the new model, a burst, and a report with
the phase error against the simulator's truth and a picture of the stitched maps."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from p4p.client.thread import Context

from edgeloop import ntnd
from edgeloop.app.answers import AnswerCollector
from edgeloop.app.loop import (
    burst,
    edge_stats,
    fly_figures,
    fly_line,
    retrain_via_pv,
    stitched_map,
)
from edgeloop.config import Config
from edgeloop.optics import illuminated_mask

log = logging.getLogger(__name__)


def phase_errors(outputs: dict[int, ntnd.Frame], sim) -> np.ndarray:
    """Per-frame mean |predicted - true| phase inside the illuminated region, after removing
    each frame's constant offset (the global phase of ptychography is not measurable)."""
    mask = illuminated_mask(sim.probe)
    errs = []
    for frame in outputs.values():
        truth = sim.true_phase(
            float(frame.attributes["SampleX"]), float(frame.attributes["SampleY"])
        )
        d = (frame.data - truth)[mask]
        errs.append(np.abs(d - d.mean()).mean())
    return np.array(errs)


def _scan(
    RE,
    det,
    stage,
    ctx: Context,
    collector: AnswerCollector,
    cfg: Config,
    num: int,
    step: float,
    center: tuple[float, float],
    rate_hz: float,
) -> tuple[float, dict, np.ndarray, int]:
    """One spiral fly scan: (seconds, edge outputs by uniqueId, stitched map, model
    version)."""
    from edgeloop.bluesky_plans import ptycho_fly_scan

    p = cfg.prefix
    t0, started = time.perf_counter(), time.time()
    RE(
        ptycho_fly_scan(
            det, stage, num, step, center=center, rate_hz=rate_hz, positions=cfg.positions
        )
    )
    seconds = time.perf_counter() - t0
    outputs = collector.take(num, 60)
    phase_map = stitched_map(ctx, p, len(outputs), started)
    return seconds, outputs, phase_map, int(ctx.get(f"{p}edge:ModelVersion")["value"])


def _save_png(
    path: Path, sim, maps: list[tuple[str, np.ndarray]], cfg: Config, extent_um: float
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = cfg.edge.map_size
    half = int(extent_um / cfg.sim.pixel_um) + cfg.model.input_size // 2
    c = n // 2
    sl = np.s_[max(c - half, 0) : c + half, max(c - half, 0) : c + half]
    truth = np.angle(sim.obj)[sl]
    truth = truth - truth.mean()
    lo, hi = np.percentile(truth, [1, 99])
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(4 * (len(maps) + 1), 4.2))
    axes[0].imshow(truth, cmap="gray", vmin=lo, vmax=hi)
    axes[0].set_title("ground truth phase")
    for ax, (title, img) in zip(axes[1:], maps):
        crop = img[sl]
        seen = crop != 0
        offset = (crop[seen] - truth[seen]).mean() if seen.any() else 0.0
        ax.imshow(np.where(seen, crop - offset, np.nan), cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle("edgeloop: stitched phase map (edge:PhaseMap) vs simulation")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def ptycho_demo(cfg, out, ctx, RE, det, stage, scan_points, step, rate_hz) -> dict:
    from edgeloop.ioc.physics import PtychoSimulator

    p = cfg.prefix
    sim = PtychoSimulator(cfg.sim)
    collector = AnswerCollector(ctx, f"{p}edge:Phase")
    centers = [(0.0, 0.0), (0.2, -0.15)]  # the second scan overlaps the first in part

    log.info("scan 1: %d points with the untrained model", scan_points)
    args = (RE, det, stage, ctx, collector, cfg, scan_points, step)
    dt1, out1, map1, v0 = _scan(*args, centers[0], rate_hz)
    retrain_s, states = retrain_via_pv(ctx, p, v0)
    log.info("scan 2: %d points with the retrained model", scan_points)
    dt2, out2, map2, v1 = _scan(*args, centers[1], rate_hz)
    seen, burst_s = burst(ctx, p, 300, collector.take)
    stats = edge_stats(ctx, cfg)
    err1, err2 = phase_errors(out1, sim), phase_errors(out2, sim)
    lat = np.array([f.attributes["LatencyMs"] for f in (*out1.values(), *out2.values())])
    extent = 0.55 * step * np.sqrt(scan_points) + max(abs(c) for xy in centers for c in xy)
    _save_png(
        out / "phase_map.png",
        sim,
        [(f"scan 1, model v{v0}", map1), (f"scan 2, model v{v1}", map2)],
        cfg,
        extent,
    )
    return {
        "mode": "ptycho",
        "frames_in": stats["FramesIn"],
        "frames_out": stats["FramesOut"],
        "dropped": stats["Dropped"],
        "bad_frames": stats["BadFrames"],
        "fps": seen / burst_s,
        "scan_fps": (len(out1) + len(out2)) / (dt1 + dt2),
        "fly": fly_figures(
            2 * scan_points,
            [[(f.timestamp, f.received) for f in o.values()] for o in (out1, out2)],
            rate_hz,
        ),
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p99": float(np.percentile(lat, 99)),
        "model_versions": [v0, v1],
        "phase_error_before": float(err1.mean()),
        "phase_error_after": float(err2.mean()),
        "phase_error_unit": "rad, mean |error| in the illuminated region",
        "scan_points": scan_points,
        "outputs_scan1": len(out1),
        "outputs_scan2": len(out2),
        "retrain_s": retrain_s,
        "retrain_states": states,
    }


def print_report(r: dict, out: Path) -> None:
    lines = [
        "edgeloop demo report",
        f"  frames in / out / dropped   {r['frames_in']} / {r['frames_out']} / {r['dropped']}",
        f"  edge throughput (burst)     {r['fps']:.1f} frames/s   (during scans "
        f"{r['scan_fps']:.1f} frames/s, set by the scan)",
        f"  latency p50 / p99           {r['latency_ms_p50']:.1f} / {r['latency_ms_p99']:.1f} ms"
        " (in the edge)",
        fly_line(r["fly"]),
        f"  model versions              {r['model_versions']}",
        f"  phase error before / after  {r['phase_error_before']:.3f} / "
        f"{r['phase_error_after']:.3f} rad",
        f"  retraining (PV write -> new model serving)  {r['retrain_s']:.0f} s",
        f"  report {out / 'report.json'}, picture {out / 'phase_map.png'}",
    ]
    print("\n".join(lines), flush=True)
