"""Fly scans against the edge: at which rate does it still answer every frame?

Starts the simulated beamline, the edge and the retraining service (``edgeloop.app.loop``),
flies the ptychography spiral (64x64 frames) and the HEDM rotation (512x512) at rising
rates through the real RunEngine, and counts the edge's answers per frame with a pipelined
PVA monitor: offered, answered, not answered, edge Dropped/MissedFrames, and the latency
from each frame's exposure (its trigger's time stamp) to its answer, p50/p99.

    python benchmarks/fly_rate.py [--ptycho-rates 100,200,400] [--hedm-rates 10,20,40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeloop.app.answers import AnswerCollector, PeakCollector
from edgeloop.app.loop import Servers, fly_figures, prepare, wait_drained
from edgeloop.config import Config


def _counts(ctx, p: str) -> dict:
    return {k: int(ctx.get(f"{p}edge:{k}")["value"]) for k in ("Dropped", "MissedFrames")}


def fly(RE, ctx, cfg: Config, plan, collector, offered: int, rate: float, stamps) -> dict:
    p = cfg.prefix
    before = _counts(ctx, p)
    t0 = time.perf_counter()
    RE(plan)
    seconds = time.perf_counter() - t0
    expected = range(1, offered + 1)  # uniqueIds restart at 1 in every run
    answers = collector.take(expected, 30)
    wait_drained(ctx, p, settle_s=0.5)
    after = _counts(ctx, p)
    row = fly_figures(offered, [[stamps(a) for u, a in answers.items() if u in expected]], rate)
    row.update({k: after[k] - before[k] for k in after}, plan_s=round(seconds, 2))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptycho-rates", default="100,200,300,500")
    parser.add_argument("--hedm-rates", default="10,20,40,80")
    parser.add_argument("--points", type=int, default=963, help="spiral points per fly scan")
    parser.add_argument("--angles", type=int, default=120, help="HEDM frames per fly scan")
    parser.add_argument("--out", default=None, help="write the rows here as JSON")
    args = parser.parse_args()

    from bluesky import RunEngine

    from edgeloop.bluesky_plans import hedm_fly_scan, make_devices, ptycho_fly_scan

    cfg = Config()
    cfg.prefix = "FLYBENCH:"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = prepare(cfg, Path(tmp) / "run", None)
        with Servers(cfg, out / "config.json", out / "logs") as system:
            ctx = system.ctx
            det, stage = make_devices(cfg.prefix, cfg.data_path / "detector")
            RE = RunEngine({})
            try:
                phase = AnswerCollector(ctx, f"{cfg.prefix}edge:Phase")
                for rate in (float(r) for r in args.ptycho_rates.split(",")):
                    plan = ptycho_fly_scan(det, stage, num=args.points, rate_hz=rate)
                    row = fly(
                        RE, ctx, cfg, plan, phase, args.points, rate,
                        lambda f: (f.timestamp, f.received),
                    )  # fmt: skip
                    rows.append({"case": "ptycho 64x64", **row})
                    print(json.dumps(rows[-1]), flush=True)
                phase.close()
                peaks = PeakCollector(ctx, f"{cfg.prefix}edge:Peaks")
                for rate in (float(r) for r in args.hedm_rates.split(",")):
                    plan = hedm_fly_scan(det, stage, 0.0, 30.0, args.angles, rate)
                    row = fly(RE, ctx, cfg, plan, peaks, args.angles, rate, lambda t: t["stamps"])
                    rows.append({"case": "hedm 512x512", **row})
                    print(json.dumps(rows[-1]), flush=True)
                peaks.close()
            finally:
                det.destroy()
                stage.destroy()
    print(f"\n{'case':14} {'Hz':>6} {'offered':>8} {'answered':>9} {'dropped':>8} "
          f"{'missed':>7} {'p50 ms':>8} {'p99 ms':>8} {'answers/s':>10}")  # fmt: skip
    for r in rows:
        p50, p99 = r["exposure_to_answer_ms_p50"], r["exposure_to_answer_ms_p99"]
        print(
            f"{r['case']:14} {r['rate_hz']:6.0f} {r['frames_offered']:8d} "
            f"{r['frames_answered']:9d} {r['Dropped']:8d} {r['MissedFrames']:7d} "
            f"{p50 or np.nan:8.1f} {p99 or np.nan:8.1f} {r['answers_per_s'] or np.nan:10.1f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
