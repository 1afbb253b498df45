"""Which pvAccess monitor request the edge should use, measured in one run.

(1) Against a p4p server (pvxs, like the simulated detector): N NTNDArray frames posted as
fast as possible; frames/s received and lost for each request.  (2) Against pvapy's
``pvapy-ad-sim-server`` (a pvDatabase server, the library areaDetector's NDPluginPva uses):
updates received per distinct frame for each request.

    python benchmarks/monitor_requests.py [--frames 2000] [--sizes 64 512]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from p4p.client.thread import Context
from p4p.server import Server
from p4p.server.thread import SharedPV

from edgeloop import ntnd
from edgeloop.config import pin_loopback
from edgeloop.edge_pva.server import MONITOR_REQUEST

REQUESTS = {
    "default": "field()",
    "edge": MONITOR_REQUEST,
    "pipeline": "field()record[pipeline=true,queueSize=32]",
}


def p4p_rates(size: int, n: int) -> dict[str, tuple[float, int]]:
    """request -> (distinct frames/s, frames lost)."""
    rng = np.random.default_rng(0)
    frames = [rng.poisson(20, (size, size)).astype(np.int32) for _ in range(8)]
    out = {}
    for name, request in REQUESTS.items():
        pv = SharedPV(initial=ntnd.build(frames[0], 0))
        with Server(providers=[{"BENCH:M:Image": pv}]), Context("pva", nt=False) as ctx:
            got, done = set(), threading.Event()

            def on(value, got=got, done=done):
                if not isinstance(value, Exception) and value["uniqueId"]:
                    got.add(value["uniqueId"])
                    if value["uniqueId"] == n:
                        done.set()

            sub = ctx.monitor("BENCH:M:Image", on, request=request)
            time.sleep(0.5)
            t0 = time.perf_counter()
            for i in range(1, n + 1):
                pv.post(ntnd.build(frames[i % 8], i))
            done.wait(30)
            out[name] = (len(got) / (time.perf_counter() - t0), n - len(got))
            sub.close()
    return out


def pvapy_repeats(fps: int = 200, runtime: float = 3.0) -> dict[str, tuple[int, int]]:
    """request -> (updates, distinct frames) from pvapy-ad-sim-server."""
    server = str(Path(sys.executable).with_name("pvapy-ad-sim-server"))
    args = ["-cn", "BENCH:AD:Image", "-nx", "128", "-ny", "128", "-fps", str(fps)]
    args += ["-rt", str(runtime), "-std", "4", "-dc", "-nf", "100"]
    proc = subprocess.Popen(
        [server, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ids = {name: [] for name in REQUESTS}
    with Context("pva", nt=False) as ctx:
        subs = [
            ctx.monitor(
                "BENCH:AD:Image",
                lambda v, n=name: (
                    ids[n].append(v["uniqueId"]) if not isinstance(v, Exception) else None
                ),
                request=request,
            )
            for name, request in REQUESTS.items()
        ]
        try:
            proc.wait(runtime + 30)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
            for sub in subs:
                sub.close()
    return {name: (len([i for i in v if i]), len(set(v) - {0})) for name, v in ids.items()}


def main() -> None:
    pin_loopback()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 512])
    args = ap.parse_args()
    print("p4p server -> p4p monitor: distinct frames/s (lost)")
    for size in args.sizes:
        rates = p4p_rates(size, args.frames)
        base = rates["pipeline"][0]
        cells = "  ".join(
            f"{k} {r:6.0f} ({lost}) x{r / base:.2f}" for k, (r, lost) in rates.items()
        )
        print(f"  {size:4d}^2  {cells}")
    print("pvapy-ad-sim-server (pvDatabase) -> p4p monitor: updates / distinct frames")
    for name, (updates, distinct) in pvapy_repeats().items():
        each = updates / max(distinct, 1)
        print(f"  {name:9s} {updates:6d} / {distinct:5d}  ({each:.1f} each)")


if __name__ == "__main__":
    main()
