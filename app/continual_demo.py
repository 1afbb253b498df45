"""``edgeloop demo --scans N`` (app layer): continual learning, with nobody at the controls.

Scan after scan over new, partly overlapping regions of the sample, the retraining policy
(``ml:AutoRetrain`` On) decides by itself when to retrain, from the edge's label-free quality
and from how much of the new data is unlike what the model was trained on; each retraining
starts from the best accepted model on a training set that grows with the scans (up to
``train.max_frames``).  Per scan the report holds the true phase error (the simulator's
truth), the edge's label-free consistency, the service's live reference error, the model
version and what triggered the retraining that followed; ``learning_curve.png`` plots them,
``scan_maps.png`` shows each scan's stitched map beside the truth and the iterative
reconstruction of the same region.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from p4p.client.thread import Context
from scipy.stats import spearmanr

from edgeloop.app.answers import AnswerCollector
from edgeloop.app.loop import edge_stats, fly_figures, fly_line, stitched_map
from edgeloop.app.ptycho_demo import phase_errors
from edgeloop.config import Config
from edgeloop.optics import illuminated_mask
from edgeloop.remote import tasks
from edgeloop.remote.pipeline import analysis_request
from edgeloop.scanfile import read_scan

log = logging.getLogger(__name__)

# scan centres (um): each new region overlaps the one before in part (a 500-point scan
# at 0.05 um spans ~1.2 um); the walk stays well inside the 6.4 um sample
CENTRES = [
    (0.0, 0.0),
    (0.45, 0.0),
    (0.22, 0.4),
    (-0.22, 0.4),
    (-0.45, 0.0),
    (-0.22, -0.4),
    (0.22, -0.4),
    (0.9, -0.4),
    (0.67, 0.4),
    (0.0, 0.8),
]


def centres(n: int) -> list[tuple[float, float]]:
    out = list(CENTRES)
    while len(out) < n:  # farther rings, for long runs
        k = len(out)
        angle, radius = 0.7 * k, 0.3 * np.sqrt(k)
        out.append((radius * np.cos(angle), radius * np.sin(angle)))
    return out[:n]


def _value(ctx: Context, pv: str):
    v = ctx.get(pv, timeout=5)
    return v["value"]


def _state(ctx: Context, p: str) -> str:
    status = ctx.get(f"{p}ml:Status", timeout=5)
    return status["value.choices"][status["value.index"]]


def wait_for_policy(ctx: Context, p: str, trigger_before: str, wait_s: float) -> dict:
    """After a scan: did the policy start a retraining within ``wait_s``?  If so, wait for it
    to end; returns trigger (None: none), state (Idle or Error), message and seconds."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + wait_s
    started = False
    while time.monotonic() < deadline:
        if _value(ctx, f"{p}ml:Trigger") != trigger_before or _state(ctx, p) != "Idle":
            started = True
            break
        time.sleep(0.25)
    if not started:
        return {"trigger": None, "state": "Idle", "message": "", "seconds": 0.0}
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        state = _state(ctx, p)
        if state in ("Idle", "Error") and _value(ctx, f"{p}ml:Trigger") != trigger_before:
            break
        time.sleep(0.5)
    return {
        "trigger": str(_value(ctx, f"{p}ml:Trigger")),
        "state": state,
        "message": str(_value(ctx, f"{p}ml:Message")),
        "seconds": time.perf_counter() - t0,
    }


def recon_labels(cfg: Config, scan: dict) -> tuple[np.ndarray, np.ndarray]:
    """The iterative reconstruction of a scan: its phase patches (the labels) and object,
    labelled as the retraining service labels it (from its labels cache when a retraining
    labelled the scan; made here otherwise: the last scans, or those the policy let pass)."""
    _, request = analysis_request(cfg, "ptychonn", [str(scan["path"])])
    request["cache_dir"] = str(cfg.registry_path / "work" / "labels_cache")
    labels = tasks.scan_labels(scan["path"], request)
    return labels["phase"], labels["object"]


def patch_errors(patches, positions, sim) -> np.ndarray:
    """Per-frame mean |phase - truth| in the illuminated region, offset removed."""
    mask = illuminated_mask(sim.probe)
    out = []
    for ph, (x, y) in zip(patches, positions):
        d = (ph - sim.true_phase(x, y))[mask]
        out.append(np.abs(d - d.mean()).mean())
    return np.array(out)


def map_patches(phase_map: np.ndarray, positions, cfg: Config) -> np.ndarray:
    """The stitched map cut at each scan position, as the edge stitched it."""
    from edgeloop.edge_pva.stitch import patch_origin

    m = cfg.model.input_size
    out = []
    for x, y in positions:
        r, c = patch_origin(x, y, cfg.edge.map_size, m, cfg.sim.pixel_um)
        out.append(phase_map[r : r + m, c : c + m])
    return np.stack(out)


def _one_scan(cfg, ctx, RE, index, det, stage, sim, collector, i, centre, points, step, rate):
    """One fly scan under the model being served, what the edge answered, what the policy
    and the service's reference made of it: (report entry, answers offered as (timestamp,
    received), phase map, run entry)."""
    from edgeloop.bluesky_plans import ptycho_fly_scan

    p = cfg.prefix
    version = int(_value(ctx, f"{p}edge:ModelVersion"))
    trigger_before = str(_value(ctx, f"{p}ml:Trigger"))
    reference_before = str(_value(ctx, f"{p}ml:ReferenceInfo"))
    log.info("scan %d at %s with model v%d", i + 1, centre, version)
    started = time.time()
    RE(
        ptycho_fly_scan(
            det, stage, points, step, center=centre, rate_hz=rate, positions=cfg.positions
        )
    )
    outputs = collector.take(points, 60)
    phase_map = stitched_map(ctx, p, len(outputs), started)
    consistency = float(_value(ctx, f"{p}edge:ScanConsistency"))
    entry = index.last_path
    errs = phase_errors(outputs, sim)
    retrain = wait_for_policy(ctx, p, trigger_before, 3 * cfg.policy.poll_s + 5)
    # the reference the service ran on this scan (it samples the detector's stream); it
    # compares trained models only, so there is none to wait for under the untrained v0
    reference, reference_info = (
        _reference_after(ctx, p, reference_before, 180) if version else (None, "")
    )
    positions = read_scan(entry)["positions_um"]
    map_err = patch_errors(map_patches(phase_map, positions, cfg), positions, sim)
    scan = {
        "scan": i + 1,
        "centre_um": list(centre),
        "frames": len(outputs),
        "model_version": version,
        "phase_error": float(errs.mean()),
        "map_error": float(map_err.mean()),
        "recon_error": None,  # once every retraining has labelled
        "map_ratio": None,
        "consistency": consistency,
        "frame_consistency": [
            (f.attributes["Consistency"], float(e))
            for f, e in zip(outputs.values(), errs)
            if "Consistency" in f.attributes
        ],
        "reference_error": reference,
        "reference_info": reference_info,
        "trigger": retrain["trigger"],
        "retrain_state": retrain["state"],
        "retrain_s": retrain["seconds"],
        "model_after": int(_value(ctx, f"{p}edge:ModelVersion")),
    }
    log.info("scan %d: %s", i + 1, {k: v for k, v in scan.items() if k != "frame_consistency"})
    offered = [(f.timestamp, f.received) for f in outputs.values()]
    return scan, offered, phase_map, entry


def continual_demo(cfg, out: Path, ctx, RE, index, det, stage, n_scans, points, step, rate):
    from edgeloop.ioc.physics import PtychoSimulator

    sim = PtychoSimulator(cfg.sim)
    collector = AnswerCollector(ctx, f"{cfg.prefix}edge:Phase")
    scans, maps, offered = [], [], []
    t_all = time.perf_counter()
    for i, centre in enumerate(centres(n_scans)):
        scan, sent, phase_map, entry = _one_scan(
            cfg, ctx, RE, index, det, stage, sim, collector, i, centre, points, step, rate
        )
        scans.append(scan)
        offered.append(sent)
        maps.append([i + 1, scan["model_version"], phase_map, entry, None])
    stats = edge_stats(ctx, cfg)
    collector.close()
    for s, m in zip(scans, maps):  # the iterative reconstruction of each scan: the bar
        scan = read_scan(m[3])
        phase, obj = recon_labels(cfg, scan)
        s["recon_error"] = float(patch_errors(phase, scan["positions_um"], sim).mean())
        s["map_ratio"] = s["map_error"] / s["recon_error"]  # the aim: 2.5 or less
        m[3], m[4] = scan["positions_um"], obj
    pooled = [pair for s in scans for pair in s.pop("frame_consistency")]
    report = {
        "mode": "ptycho",
        "scans": scans,
        "consistency_error_spearman": _spearman([c for c, _ in pooled], [e for _, e in pooled]),
        "consistency_error_spearman_scans": _spearman(
            [s["consistency"] for s in scans], [s["phase_error"] for s in scans]
        ),
        "frames_in": stats["FramesIn"],
        "frames_out": stats["FramesOut"],
        "dropped": stats["Dropped"],
        "bad_frames": stats["BadFrames"],
        "fly": fly_figures(n_scans * points, offered, rate),
        "scan_points": points,
        "continual_s": time.perf_counter() - t_all,
        "phase_error_unit": "rad, mean |error| in the illuminated region",
    }
    _learning_curve(out / "learning_curve.png", scans)
    _scan_maps(out / "scan_maps.png", maps, sim, cfg)
    return report


def _reference_after(ctx: Context, p: str, before: str, timeout: float) -> tuple:
    """The service's next reference after ``before``: (error or None, what ml:ReferenceInfo
    said, a failure's reason included)."""
    from edgeloop.remote.reference_monitor import FAILED

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = str(_value(ctx, f"{p}ml:ReferenceInfo"))
        if info != before:
            value = float(_value(ctx, f"{p}ml:ReferenceError"))  # put before the info
            failed = info.startswith(FAILED) or not np.isfinite(value)
            return (None if failed else value), info
        time.sleep(0.5)
    return None, f"no reference in {timeout:.0f} s"


def _spearman(a, b) -> float | None:
    if len(a) < 3:
        return None
    rho = spearmanr(a, b).statistic
    return float(rho) if np.isfinite(rho) else None


def _learning_curve(path: Path, scans: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [s["scan"] for s in scans]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label, style in (
        ("phase_error", "true phase error (per frame)", "o-"),
        ("map_error", "true error of the stitched map", "s-"),
        ("consistency", "edge:ScanConsistency (label-free)", "^--"),
        ("reference_error", "ml:ReferenceError (NN vs ptychi, live)", "d:"),
        ("recon_error", "iterative reconstruction's error", "x-"),
    ):
        ys = [np.nan if s[key] is None else s[key] for s in scans]
        ax.plot(n, ys, style, label=label)
    for s in scans:
        if s["trigger"]:
            ax.axvline(s["scan"] + 0.5, color="0.85", lw=4, zorder=0)
    ax.set_xticks(n)
    ax.set_xlabel("scan (grey: the policy retrained after it)")
    ax.set_ylabel("rad")
    ax.set_yscale("log")
    ax.set_title("edgeloop: continual learning, scan after scan")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _scan_maps(path: Path, maps, sim, cfg: Config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeloop.edge_pva.stitch import patch_origin

    m = cfg.model.input_size
    truth_all = np.angle(sim.obj)
    fig, axes = plt.subplots(len(maps), 3, figsize=(9, 3 * len(maps)), squeeze=False)
    for row, (n, version, phase_map, positions, obj) in zip(axes, maps):
        origins = np.array(
            [patch_origin(x, y, cfg.edge.map_size, m, cfg.sim.pixel_um) for x, y in positions]
        )
        (r0, c0), (r1, c1) = origins.min(0) + m // 4, origins.max(0) + 3 * m // 4
        sl = np.s_[r0:r1, c0:c1]
        truth = truth_all[sl] - truth_all[sl].mean()
        lo, hi = np.percentile(truth, [1, 99])
        crop = phase_map[sl]
        seen = crop != 0
        offset = (crop[seen] - truth[seen]).mean() if seen.any() else 0.0
        row[0].imshow(truth, cmap="gray", vmin=lo, vmax=hi)
        row[0].set_title(f"scan {n}: truth")
        row[1].imshow(np.where(seen, crop - offset, np.nan), cmap="gray", vmin=lo, vmax=hi)
        row[1].set_title(f"edge:PhaseMap, model v{version}")
        if obj is not None:
            recon = np.angle(obj)
            recon = recon - np.median(recon)
            row[2].imshow(recon, cmap="gray", vmin=lo, vmax=hi)
            row[2].set_title("iterative (ptychi), whole object")
        for ax in row:
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def print_report(r: dict, out: Path) -> None:
    lines = ["edgeloop demo --scans report"]
    lines.append(
        f"  {'scan':>4} {'model':>5} {'phase err':>9} {'map err':>8} {'recon err':>9} "
        f"{'map/rec':>7} {'consist.':>8} {'ref err':>8}  trigger after the scan"
    )

    def f(x):
        return f"{x:.4f}" if x is not None else "   -  "

    for s in r["scans"]:
        lines.append(
            f"  {s['scan']:>4} v{s['model_version']:<4} {f(s['phase_error']):>9} "
            f"{f(s['map_error']):>8} {f(s['recon_error']):>9} "
            f"{'-' if s['map_ratio'] is None else format(s['map_ratio'], '.2f'):>7} "
            f"{f(s['consistency']):>8} "
            f"{f(s['reference_error']):>8}  {s['trigger'] or '-'}"
        )
    rho = r["consistency_error_spearman"]
    lines += [
        f"  frames in / out / dropped   {r['frames_in']} / {r['frames_out']} / {r['dropped']}",
        fly_line(r["fly"]),
        f"  Spearman(consistency, true error) over frames: {'-' if rho is None else f'{rho:.2f}'}",
        f"  {len(r['scans'])} scans in {r['continual_s'] / 60:.1f} min; report "
        f"{out / 'report.json'}, {out / 'learning_curve.png'}, {out / 'scan_maps.png'}",
    ]
    print("\n".join(lines), flush=True)
