"""``edgeloop demo`` (app layer): start everything, scan with an untrained model, retrain
through a PV write as an operator would, scan again with the new model, stop, and report;
the technique's own steps are in ``ptycho_demo`` and ``hedm_demo``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from edgeloop.app import continual_demo, hedm_demo, ptycho_demo, screens
from edgeloop.app.loop import Servers, prepare, set_codec
from edgeloop.app.signals import AbortOnSignal
from edgeloop.config import Config, check_mode

log = logging.getLogger(__name__)

# Fly-scan rates (frames/s) of the demo, about 80 % of the highest at which the edge keeps
# pace on 2 cores shared with the simulated detector and the client (ptycho 250, HEDM 80:
# benchmarks/fly_rate.py); above those every frame is still answered, but a backlog builds.
FLY_RATE_HZ = {"ptycho": 200.0, "hedm": 60.0}


def run_demo(
    cfg: Config,
    out: str | Path,
    scan_points: int = 500,
    epochs: int | None = None,
    step: float = 0.05,
    mode: str | None = None,
    codec: str | None = None,
    rate_hz: float | None = None,
    scans: int | None = None,
) -> dict:
    """The whole loop once, for ``mode`` (default ``cfg.mode``): ptycho or hedm, flying the
    scans at ``rate_hz`` frames/s (default :data:`FLY_RATE_HZ` of the mode); with ``codec``,
    the detector sends its frames compressed (det:Codec1).  With ``scans``, continual
    learning instead: that many scans, retrained by the policy (:mod:`continual_demo`)."""
    cfg.mode = check_mode(mode or cfg.mode)
    if scans:
        if cfg.mode != "ptycho":
            raise ValueError("demo --scans runs ptychography (--mode ptycho)")
        continual_settings(cfg, scan_points)
    t_demo = time.perf_counter()
    out = prepare(cfg, out, epochs)
    devices: list = []
    with Servers(cfg, out / "config.json", out / "logs") as system:
        try:
            from bluesky import RunEngine

            from edgeloop.bluesky_plans import make_devices

            if codec:
                set_codec(cfg.prefix, codec)
            # the IOC writes the frames here; Tiled (or a run index) points the retraining there
            det, stage = make_devices(cfg.prefix, cfg.data_path / "detector")
            devices += [det, stage]
            RE = RunEngine({}, context_managers=[AbortOnSignal])  # not pause on Ctrl-C
            index = run_store(cfg)
            RE.subscribe(index)
            rate = rate_hz or FLY_RATE_HZ[cfg.mode]
            if scans:
                report = continual_demo.continual_demo(
                    cfg, out, system.ctx, RE, index, det, stage, scans, scan_points, step, rate
                )
            elif cfg.mode == "hedm":
                report = hedm_demo.hedm_demo(
                    cfg, out, system.ctx, RE, index, det, stage, scan_points, rate
                )
            else:
                report = ptycho_demo.ptycho_demo(
                    cfg, out, system.ctx, RE, det, stage, scan_points, step, rate
                )
            try:  # and the operator's view of the loop now; a failed picture loses no report
                screens.write(out / "screens")
                overview = out / "screens" / "overview.bob"
                screens.render(overview, cfg.prefix, out / "overview.png")
            except Exception:
                log.exception("could not draw the overview screen")
        finally:
            for device in devices:  # disconnect cleanly before the servers go away
                device.destroy()
    report["demo_s"] = time.perf_counter() - t_demo
    report["codec"] = codec or "none"
    (out / "report.json").write_text(json.dumps(report, indent=2))
    printer = continual_demo if scans else hedm_demo if cfg.mode == "hedm" else ptycho_demo
    printer.print_report(report, out)
    return report


def run_store(cfg: Config):
    """Where the demo's runs are recorded (a callback whose ``last_path`` is the latest
    run's reference): TiledWriter on the Tiled server, else run entries in data_dir."""
    from edgeloop.bluesky_plans import RunIndex, tiled_writer
    from edgeloop.tiled_runs import connect

    if cfg.tiled.enabled:
        return tiled_writer(connect(cfg.tiled, cfg.data_path), cfg.positions)
    return RunIndex(cfg.data_path, cfg.positions)


# seconds of training in a retraining of the continual demo: with staging and ptychi's
# labels of the new scan (15-40 s), about the two minutes a retraining is aimed at on 2 cores
CONTINUAL_TRAIN_S = 80.0


def continual_settings(cfg: Config, scan_points: int) -> None:
    """The policy retrains by itself, as soon as a new scan calls for it; warm-started
    retrainings see a fixed number of samples (scratch: 40 epochs of one scan), so they
    do not grow with the buffer, and a training stops after :data:`CONTINUAL_TRAIN_S`
    unless the configuration sets its own ``train.time_budget_s``."""
    cfg.policy.enabled = True
    cfg.policy.min_interval_s = 0.0
    cfg.policy.min_new_frames = max(1, scan_points // 4)
    train = cfg.train
    train.sample_budget = train.sample_budget or train.epochs * scan_points
    train.time_budget_s = train.time_budget_s or CONTINUAL_TRAIN_S
