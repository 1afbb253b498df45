"""Edge server throughput and latency, against the two ceilings measured in the same run.

Posts N frames as fast as a p4p server can to (1) a bare p4p monitor (transport ceiling),
(2) the model alone (inference ceiling, batches of up to max_batch), and (3) the edge server
(transport + queue + inference + publishing). Prints frames/s, latency percentiles, and the
edge's rate as a fraction of min(transport, model).

    python benchmarks/edge_throughput.py [--frames 400] [--sizes 64 512] [--width 16]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import threading
import time

import numpy as np
from p4p.client.thread import Context
from p4p.server import Server
from p4p.server.thread import SharedPV

from edgeloop import ntnd
from edgeloop.config import Config, pin_loopback
from edgeloop.edge_pva.server import MONITOR_REQUEST, EdgeServer


def _frames(size: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.poisson(20.0, (size, size)).astype(np.int32) for _ in range(min(n, 16))]


def _post_all(
    pv: SharedPV,
    frames,
    n: int,
    pace_s: float = 0.0,
    attributes: dict | None = None,
    codec: str = "",
) -> float:
    """Post n frames (built, and compressed with ``codec``, before the clock starts)."""
    values = [
        ntnd.build(frames[i % len(frames)], i + 1, attributes, codec=codec) for i in range(n)
    ]
    t0 = time.perf_counter()
    for value in values:
        pv.post(value)
        if pace_s:
            time.sleep(pace_s)
    return time.perf_counter() - t0


def transport_ceiling(size: int, n: int) -> float:
    pv = SharedPV(initial=ntnd.build(np.zeros((size, size), np.int32), 0))
    got, done = [], threading.Event()
    with Server(providers=[{"BENCH:T:Image": pv}]):
        ctx = Context("pva", nt=False)

        def cb(v):
            if not isinstance(v, Exception) and v["uniqueId"] > 0:
                got.append(time.perf_counter())
                if v["uniqueId"] >= n:  # the last frame: any before it that were lost stay so
                    done.set()

        sub = ctx.monitor("BENCH:T:Image", cb, request=MONITOR_REQUEST)
        time.sleep(0.5)
        t0 = time.perf_counter()
        _post_all(pv, _frames(size, n), n)
        done.wait(60)
        sub.close()
        ctx.close()
    return len(got) / (got[-1] - t0) if got else 0.0


def model_ceiling(edge: EdgeServer, size: int, n: int) -> float:
    served = edge.slot.get()
    frames = _frames(size, n)
    batch = edge.cfg.edge.max_batch
    served.infer(frames[:batch])  # warm-up
    t0 = time.perf_counter()
    done = 0
    while done < n:
        k = min(batch, n - done)
        served.infer([frames[(done + i) % len(frames)] for i in range(k)])
        done += k
    return n / (time.perf_counter() - t0)


def edge_rate(
    edge: EdgeServer,
    source: SharedPV,
    frames,
    n: int,
    pace_s: float = 0.0,
    attributes: dict | None = None,
    output: str = "Phase",
    frame_id: str = "uniqueId",
    codec: str = "",
):
    """Post n frames (cycling through ``frames``) and time the edge's answers on
    ``edge:<output>`` (whose field ``frame_id`` is 0 for the placeholder).
    Returns (answers/s, latencies ms, frames dropped, frames posted/s)."""
    ctx = Context("pva", nt=False)
    outs = []
    sub = ctx.monitor(
        f"{edge.prefix}edge:{output}",
        lambda v: (
            None
            if isinstance(v, Exception) or v[frame_id] == 0
            else outs.append(time.perf_counter())
        ),
        request=MONITOR_REQUEST,
    )
    time.sleep(0.5)
    edge.latencies.clear()
    out0, drop0, missed0 = edge.frames_out, edge.queue.dropped, edge.frame_ids.missed
    t0 = time.perf_counter()
    post_s = _post_all(source, frames, n, pace_s, attributes, codec)
    deadline = time.monotonic() + 120

    def answered_all() -> bool:  # frames the transport lost never arrive
        lost = edge.queue.dropped - drop0 + edge.frame_ids.missed - missed0
        return edge.frames_out - out0 >= n - lost

    while not answered_all() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    sub.close()
    ctx.close()
    rate = len(outs) / (outs[-1] - t0) if outs else 0.0
    lat = np.array(edge.latencies)
    return rate, lat, edge.queue.dropped - drop0, n / post_s


def main() -> None:
    pin_loopback()  # before the first Context or Server reads the EPICS settings
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--codecs", nargs="*", default=[], help="also time bursts of frames compressed so"
    )
    args = ap.parse_args()
    print(
        f"{'frame':>7} {'transport':>10} {'model':>8} {'edge':>8} {'edge/min':>9} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'dropped':>8} {'paced fps':>10} {'p50 ms':>7} "
        f"{'p99 ms':>7}"
    )
    for size in args.sizes:
        cfg = Config(prefix=f"BENCH{size}:", registry_dir=tempfile.mkdtemp())
        cfg.model.width = args.width
        cfg.edge.threads = args.threads
        cfg.edge.queue_size = args.frames + 1  # measure throughput, not the drop policy
        source = SharedPV(initial=ntnd.build(np.zeros((size, size), np.int32), 0))
        server = Server(providers=[{f"{cfg.prefix}src:Image": source}])
        edge = EdgeServer(cfg, input_pv=f"{cfg.prefix}src:Image").start()
        try:
            transport = transport_ceiling(size, args.frames)
            model = model_ceiling(edge, size, args.frames)
            frames = _frames(size, args.frames)
            rate, lat, dropped, _ = edge_rate(edge, source, frames, args.frames)
            paced_fps = 0.5 * min(transport, model)
            _, paced_lat, _, _ = edge_rate(edge, source, frames, args.frames // 2, 1.0 / paced_fps)
            coded = {
                c: edge_rate(edge, source, frames, args.frames, codec=c)[0] for c in args.codecs
            }
        finally:
            edge.stop()
            server.stop()
        ceiling = min(transport, model)
        p50, p99 = np.percentile(lat, [50, 99]) if len(lat) else (np.nan, np.nan)
        q50, q99 = np.percentile(paced_lat, [50, 99]) if len(paced_lat) else (np.nan, np.nan)
        print(
            f"{size:>4}^2 {transport:>10.0f} {model:>8.1f} {rate:>8.1f} {rate / ceiling:>9.2f} "
            f"{p50:>7.1f} {p99:>7.1f} {dropped:>8d} {paced_fps:>10.1f} {q50:>7.1f} "
            f"{q99:>7.1f}"
        )
        for codec, coded_rate in coded.items():
            print(
                f"        burst of {codec} frames: {coded_rate:.1f} frames/s, "
                f"{coded_rate / rate:.2f} of the uncompressed burst"
            )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"frames/s; latency = receive -> publish inside the edge; a burst of {args.frames} "
        "frames queues (its latency is mostly queueing), the paced run posts at half the "
        f"ceiling; peak RSS {rss:.0f} MB"
    )


if __name__ == "__main__":
    main()
