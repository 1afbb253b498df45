"""How much ten clients watching the edge slow its frame path, measured in one run.

The edge (in process) answers N frames posted as fast as a p4p server can, first with only
the timing client, then with ten more clients (each its own context, all in another process)
monitoring edge:Phase and edge:PhaseMap; the rounds alternate, and the ratio of the median
rates is printed (the target: no more than 10 % slower).

    python benchmarks/monitor_load.py [--frames 600] [--clients 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import numpy as np
from edge_throughput import _frames, edge_rate
from p4p.server import Server
from p4p.server.thread import SharedPV

from edgeloop import ntnd
from edgeloop.config import Config, pin_loopback
from edgeloop.edge_pva.server import EdgeServer

WATCHERS = """
import os, sys, time
from p4p.client.thread import Context
os.nice(19)  # clients sit on other machines: here they take only what the edge leaves
prefix, n = sys.argv[1], int(sys.argv[2])
updates = [0]
def on(value):
    if not isinstance(value, Exception):
        updates[0] += 1
contexts = [Context("pva", nt=False) for _ in range(n)]
subs = [c.monitor(prefix + "edge:" + pv, on) for c in contexts for pv in sys.argv[3].split(",")]
print("watching", flush=True)
sys.stdin.readline()
for s in subs:
    s.close()
for c in contexts:
    c.close()
print(updates[0], flush=True)
"""


class Watchers:
    """``n`` clients in a process of their own (as operator screens and scientists' sessions
    are), each its own context, monitoring ``pvs`` (comma-separated edge PV names)."""

    def __init__(self, prefix: str, n: int, pvs: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WATCHERS, prefix, str(n), pvs],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "watching"
        time.sleep(1.0)  # every monitor connected

    def close(self) -> int:
        """Stop; the updates the clients received."""
        out, _ = self.proc.communicate("\n", timeout=60)
        return int(out.split()[-1])


def main() -> None:
    pin_loopback()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pvs", default="Phase,PhaseMap", help="edge PVs each client monitors")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(prefix="BENCH:L:", registry_dir=f"{tmp}/models", data_dir=f"{tmp}/data")
        source = SharedPV(initial=ntnd.build(np.zeros((64, 64), np.int32), 0))
        frames = _frames(64, args.frames)
        where = {"SampleX": 0.1, "SampleY": -0.1}  # every answer also goes into the map
        rates: dict[str, list[float]] = {"alone": [], "watched": []}
        with Server(providers=[{"BENCH:L:src:Image": source}]):
            with EdgeServer(cfg, input_pv="BENCH:L:src:Image") as edge:
                edge_rate(edge, source, frames, 100, attributes=where)  # warm-up
                for _ in range(args.rounds):
                    for case in ("alone", "watched"):
                        watchers = None
                        if case == "watched":
                            watchers = Watchers(cfg.prefix, args.clients, args.pvs)
                        try:
                            rate, *_ = edge_rate(
                                edge, source, frames, args.frames, attributes=where
                            )
                        finally:
                            if watchers is not None:
                                updates = watchers.close()
                        rates[case].append(rate)
                        print(
                            f"{case:8s} {rate:7.1f} frames/s"
                            + (f"  ({updates} updates to the watchers)" if watchers else ""),
                            flush=True,
                        )
    alone, watched = np.median(rates["alone"]), np.median(rates["watched"])
    print(
        f"\nmedian: alone {alone:.1f}, with {args.clients} clients on {args.pvs} "
        f"{watched:.1f} frames/s; ratio {watched / alone:.3f} (target >= 0.90)"
    )


if __name__ == "__main__":
    main()
