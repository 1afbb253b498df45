"""End-to-end frames/s of ``edgeloop edge --workers N`` against pvapy-ad-sim-server.

pvapy-ad-sim-server (a pvDatabase server, with the data distributor areaDetector's
NDPluginPva also has) streams ``size`` x ``size`` uint8 frames faster than the edge answers
them; the edge (one process for N=1, N workers and their aggregate otherwise) answers what it
can; an independent p4p client counts the distinct uniqueIds on ``edge:Phase``.  The figure
is answers per second between the first and the last answer, so it is the edge's ceiling,
whatever the source offered.  On a host with fewer cores than workers (each worker's
inference takes a core) N=2 shows the cost of the second process and the aggregate, not
the gain; with a core (or a GPU) per worker the rate adds up to N times one worker's, until
the aggregate or the source's link is the limit.

    python benchmarks/edge_workers.py [--size 512] [--frames 600] [--fps 400] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from p4p.client.thread import Context
from p4p.server import Server
from p4p.server.thread import SharedPV

from edgeloop import ntnd
from edgeloop.app.processes import ManagedProcess, wait_for_pv
from edgeloop.app.pvapy_source import AdSimServer
from edgeloop.config import Config, pin_loopback

ANSWERS_REQUEST = "field(uniqueId)record[pipeline=true,queueSize=256]"
COUNTERS = ("FramesIn", "FramesOut", "Dropped", "BadFrames", "MissedFrames", "Repeats")


class _Answers:
    """Arrival time of each distinct uniqueId on an NTNDArray PV."""

    def __init__(self, ctx: Context, pv: str, request: str = ANSWERS_REQUEST):
        self.times: dict[int, float] = {}
        self.lock = threading.Lock()
        self.sub = ctx.monitor(pv, self._on, request=request)

    def _on(self, value):
        if not isinstance(value, Exception) and value["uniqueId"] > 0:
            with self.lock:
                self.times.setdefault(int(value["uniqueId"]), time.perf_counter())

    def quiet_for(self, seconds: float) -> bool:
        with self.lock:
            last = max(self.times.values(), default=None)
        return last is not None and time.perf_counter() - last > seconds


def measure_workers(
    n: int, size: int = 512, frames: int = 600, fps: float = 400.0, start_delay: float = 25.0
) -> dict:
    """One run: ``edgeloop edge --workers n`` (plain ``edge`` for n=1) answering ``frames``
    frames offered at ``fps``; the answers/s an independent client counted, and the edge's
    counters.  The source holds its frames for ``start_delay`` s, for the edge to start."""
    pin_loopback()
    prefix = f"BW{secrets.token_hex(3)}:"
    channel = f"{prefix}sim:Image"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(prefix=prefix, data_dir=f"{tmp}/data", registry_dir=f"{tmp}/models")
        cfg.dump(Path(tmp) / "config.json")
        logs = Path(tmp) / "logs"
        sim = ["-nx", str(size), "-ny", str(size), "-dt", "uint8", "-nf", "10"]
        source = AdSimServer(
            channel,
            sim,
            logs / "source.log",
            fps=fps,
            runtime=frames / fps,
            start_delay=start_delay,
            shutdown_delay=1,
        )
        edge_args = ["edge", "-q", "--prefix", prefix, "--config", f"{tmp}/config.json"]
        edge_args += ["--input-pv", channel] + (["--workers", str(n)] if n > 1 else [])
        edge = ManagedProcess("edge", edge_args, logs / "edge.log")
        ctx = Context("pva", nt=False)
        try:
            t0 = time.monotonic()
            for name in [f"edge:w{k}:Started" for k in range(1, n + 1)] if n > 1 else []:
                wait_for_pv(ctx, prefix + name, 120, edge)
            answers = _Answers(ctx, f"{prefix}edge:Phase")
            sent = _Answers(ctx, channel, "field(uniqueId)record[queueSize=256]")
            wait_for_pv(ctx, f"{prefix}edge:FramesIn", 120, edge)
            started_s = time.monotonic() - t0
            if ctx.get(channel, request="field(uniqueId)")["uniqueId"] != 0:
                raise RuntimeError(
                    f"the edge took {started_s:.0f} s to start, longer than the source's "
                    f"start delay ({start_delay} s): run again with a longer one"
                )
            source.wait_exit(start_delay + frames / fps + 60)
            while not answers.quiet_for(3.0):
                time.sleep(0.5)
            answers.sub.close()
            sent.sub.close()
            counters = {c: ctx.get(f"{prefix}edge:{c}")["value"] for c in COUNTERS}
            shares = [
                ctx.get(f"{prefix}edge:w{k}:FramesOut")["value"] for k in range(1, n + 1)
            ] if n > 1 else []  # fmt: skip
        finally:
            ctx.close()
            edge.stop(timeout=30)
            source.stop()
    times = sorted(answers.times.values())
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {
        "workers": n,
        "size": size,
        "offered_fps": fps,
        "sent": len(sent.times),
        "answered": len(times),
        "frames_per_s": (len(times) - 1) / span if len(times) > 1 else 0.0,
        "counters": counters,
        "per_worker_frames_out": shares,
        "edge_start_s": round(started_s, 1),
        "cpus": len(os.sched_getaffinity(0)),
    }


def measure_aggregate(frames: int = 6000, rate: float = 3000.0, size: int = 64) -> dict:
    """The aggregate's own ceiling: two stand-in workers (p4p SharedPVs in this process)
    post Phase and Amplitude answers (with a stage position: each is stitched) at ``rate``
    to ``edgeloop edge --workers 2 --remote-workers`` (the aggregate alone); an
    independent client counts the answers it serves per second."""
    pin_loopback()
    prefix = f"BA{secrets.token_hex(3)}:"
    rng = np.random.default_rng(0)
    pvs, values = {}, []
    for k in (1, 2):
        for kind in ("Phase", "Amplitude"):
            pvs[f"{prefix}edge:w{k}:{kind}"] = SharedPV(
                initial=ntnd.build(np.zeros((size, size), np.float32), 0)
            )
    for uid in range(1, frames + 1):
        angle, radius = 0.3 * uid, 0.02 * np.sqrt(uid)  # a spiral scan, um
        attrs = {"ModelVersion": 0, "LatencyMs": 1.0, "ConsistencyData": 0.05}
        attrs.update(SampleX=radius * np.cos(angle), SampleY=radius * np.sin(angle))
        phase = rng.normal(0, 0.1, (size, size)).astype(np.float32)
        values.append(ntnd.build(phase, uid, attrs))
    with tempfile.TemporaryDirectory() as tmp, Server(providers=[pvs]):
        cfg = Config(prefix=prefix, data_dir=f"{tmp}/data", registry_dir=f"{tmp}/models")
        cfg.dump(Path(tmp) / "config.json")
        args = ["edge", "-q", "--prefix", prefix, "--config", f"{tmp}/config.json"]
        args += ["--workers", "2", "--remote-workers"]
        aggregate = ManagedProcess("aggregate", args, Path(tmp) / "logs" / "aggregate.log")
        ctx = Context("pva", nt=False)
        try:
            wait_for_pv(ctx, f"{prefix}edge:FramesIn", 120, aggregate)
            answers = _Answers(ctx, f"{prefix}edge:Phase")
            time.sleep(3.0)  # the aggregate's monitors of the stand-ins connect
            t0 = time.perf_counter()
            for i, value in enumerate(values):
                k = 1 + value["uniqueId"] % 2
                if i % 50 == 0:  # paced in bursts of 50
                    time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
                pvs[f"{prefix}edge:w{k}:Phase"].post(value)
                pvs[f"{prefix}edge:w{k}:Amplitude"].post(value)
            posted_s = time.perf_counter() - t0
            while not answers.quiet_for(2.0):
                time.sleep(0.5)
            answers.sub.close()
        finally:
            ctx.close()
            aggregate.stop(timeout=30)
    times = sorted(answers.times.values())
    return {
        "offered_fps": frames / posted_s,
        "answered": len(times),
        "frames_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=600, help="frames the source offers")
    parser.add_argument("--fps", type=float, default=400.0, help="rate the source offers")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--start-delay", type=float, default=25.0)
    parser.add_argument(
        "--aggregate", action="store_true", help="also the aggregate's own ceiling"
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    results = []
    for n in args.workers:
        r = measure_workers(n, args.size, args.frames, args.fps, args.start_delay)
        results.append(r)
        print(
            f"N={n}: {r['frames_per_s']:.1f} frames/s end to end ({r['answered']} answered "
            f"of {r['sent']} sent at {args.fps:.0f}/s, {args.size}x{args.size}; "
            f"counters {r['counters']}; per worker {r['per_worker_frames_out']}; "
            f"{r['cpus']} CPUs)",
            flush=True,
        )
    base = results[0]["frames_per_s"]
    for r in results[1:]:
        print(f"N={r['workers']} / N={results[0]['workers']}: {r['frames_per_s'] / base:.2f}")
    if args.aggregate:
        agg = measure_aggregate()
        results.append({"aggregate": agg})
        print(
            f"aggregate alone: {agg['frames_per_s']:.0f} answers/s served ({agg['answered']} "
            f"of 6000 posted at {agg['offered_fps']:.0f}/s by two stand-in workers)",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
