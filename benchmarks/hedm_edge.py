"""HEDM at the edge: where a frame's time goes, and the edge server's frames/s and latency.

Renders simulated 512x512 HEDM frames, times each stage of one frame (peak finder, patch
cropping, BraggNN on all patches in one batch, the NTTable), then posts a burst of frames to
an in-process edge server over pvAccess and counts the edge:Peaks tables that come back.

    python benchmarks/hedm_edge.py [--frames 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
from edge_throughput import edge_rate  # beside this script
from p4p.server import Server
from p4p.server.thread import SharedPV

from edgeloop import ntnd
from edgeloop.config import Config, pin_loopback
from edgeloop.edge_pva.peak_tables import peak_table
from edgeloop.edge_pva.server import EdgeServer
from edgeloop.ioc.hedm_sim import HedmSimulator
from edgeloop.peaks import crop_patches, find_peaks


def stage_times(edge: EdgeServer, frames: list[np.ndarray]) -> dict[str, float]:
    """Median ms per frame of each stage, and patches per frame."""
    served = edge.slots["braggnn"].get()
    times = {"find": [], "crop": [], "braggnn": [], "table": []}
    counts = []
    for _ in range(3):
        for frame in frames:
            t0 = time.perf_counter()
            peaks = find_peaks(frame)
            t1 = time.perf_counter()
            patches, tops = crop_patches(frame, peaks, 11)
            t2 = time.perf_counter()
            (centre,) = served.infer(patches) if len(patches) else (np.zeros((0, 2)),)
            t3 = time.perf_counter()
            peak_table(
                1,
                {
                    "x": tops[:, 1] + centre[:, 0],
                    "y": tops[:, 0] + centre[:, 1],
                    "intensity": peaks.intensity,
                    "max": peaks.maxima,
                    "saturated": peaks.saturated,
                    "border": peaks.border,
                },
            )
            t4 = time.perf_counter()
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[key].append(dt * 1e3)
            counts.append(len(patches))
    out = {k: float(np.median(v)) for k, v in times.items()}
    out["patches"] = float(np.mean(counts))
    return out


def main() -> None:
    pin_loopback()  # before the first Context or Server reads the EPICS settings
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    cfg = Config(prefix="BENCHH:", registry_dir=tempfile.mkdtemp(), mode="hedm")
    cfg.edge.threads = args.threads
    cfg.edge.queue_size = args.frames + 1  # measure throughput, not the drop policy
    sim = HedmSimulator(cfg.hedm)
    t0 = time.perf_counter()
    frames = [sim.frame(float(w))[0] for w in np.linspace(0, 30, 16)]
    render_ms = (time.perf_counter() - t0) / len(frames) * 1e3
    n = cfg.hedm.frame_size
    source = SharedPV(initial=ntnd.build(np.zeros((n, n), np.uint16), 0))
    server = Server(providers=[{f"{cfg.prefix}src:Image": source}])
    edge = EdgeServer(cfg, input_pv=f"{cfg.prefix}src:Image").start()
    try:
        st = stage_times(edge, frames)
        rate, lat, dropped, post_fps = edge_rate(
            edge,
            source,
            frames,
            args.frames,
            attributes={"Mode": "hedm"},
            output="Peaks",
            frame_id="timeStamp.userTag",
        )
    finally:
        edge.stop()
        server.stop()
    total = sum(st[k] for k in ("find", "crop", "braggnn", "table"))
    p50, p99 = np.percentile(lat, [50, 99]) if len(lat) else (np.nan, np.nan)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"HEDM {n}x{n} frames, {st['patches']:.1f} peaks per frame, {args.threads} torch "
        f"thread(s); simulator renders a frame in {render_ms:.1f} ms\n"
        f"  per frame (median ms): finder {st['find']:.2f}  crop {st['crop']:.2f}  "
        f"BraggNN {st['braggnn']:.2f} ({st['braggnn'] * 1e3 / max(st['patches'], 1):.0f} "
        f"us/peak)  table {st['table']:.2f}  = {total:.2f} ms -> ceiling "
        f"{1e3 / total:.0f} frames/s\n"
        f"  edge burst of {args.frames}: {rate:.1f} frames/s ({rate * total / 1e3:.2f} of "
        f"the ceiling; posted at {post_fps:.0f}/s), latency p50/p99 {p50:.1f}/{p99:.1f} ms "
        f"(mostly queueing), dropped {dropped}; peak RSS {rss:.0f} MB"
    )


if __name__ == "__main__":
    main()
