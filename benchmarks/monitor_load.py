"""How much ten clients watching the edge slow its frame path, measured in one run.

The edge (in process) answers N frames posted as fast as a p4p server can, first with only
the timing client, then with ten more clients (each its own context) monitoring edge:Phase
and edge:PhaseMap; the rounds alternate, and the ratio of the median rates is printed
(the target: no more than 10 % slower).

    python benchmarks/monitor_load.py [--frames 600] [--clients 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
from edge_throughput import _frames, edge_rate
from p4p.client.thread import Context
from p4p.server import Server
from p4p.server.thread import SharedPV

from edgeloop import ntnd
from edgeloop.config import Config, pin_loopback
from edgeloop.edge_pva.server import EdgeServer


class Watchers:
    """``n`` clients, each with its own context, monitoring Phase and PhaseMap."""

    def __init__(self, prefix: str, n: int):
        self.updates = 0
        self.contexts = [Context("pva", nt=False) for _ in range(n)]
        self.subs = [
            ctx.monitor(f"{prefix}edge:{pv}", self._on)
            for ctx in self.contexts
            for pv in ("Phase", "PhaseMap")
        ]

    def _on(self, value) -> None:
        if not isinstance(value, Exception):
            self.updates += 1

    def close(self) -> None:
        for sub in self.subs:
            sub.close()
        for ctx in self.contexts:
            ctx.close()


def main() -> None:
    pin_loopback()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(prefix="BENCH:L:", registry_dir=f"{tmp}/models", data_dir=f"{tmp}/data")
        cfg.edge.map_publish_s = 0.2
        source = SharedPV(initial=ntnd.build(np.zeros((64, 64), np.int32), 0))
        frames = _frames(64, args.frames)
        where = {"SampleX": 0.1, "SampleY": -0.1}  # every answer also goes into the map
        rates: dict[str, list[float]] = {"alone": [], "watched": []}
        with Server(providers=[{"BENCH:L:src:Image": source}]):
            with EdgeServer(cfg, input_pv="BENCH:L:src:Image") as edge:
                edge_rate(edge, source, frames, 100, attributes=where)  # warm-up
                for _ in range(args.rounds):
                    for case in ("alone", "watched"):
                        watchers = (
                            Watchers(cfg.prefix, args.clients) if case == "watched" else None
                        )
                        try:
                            rate, *_ = edge_rate(
                                edge, source, frames, args.frames, attributes=where
                            )
                        finally:
                            if watchers is not None:
                                updates = watchers.updates
                                watchers.close()
                        rates[case].append(rate)
                        print(
                            f"{case:8s} {rate:7.1f} frames/s"
                            + (f"  ({updates} updates to the watchers)" if watchers else ""),
                            flush=True,
                        )
    alone, watched = np.median(rates["alone"]), np.median(rates["watched"])
    print(
        f"\nmedian: alone {alone:.1f}, with {args.clients} clients on Phase + PhaseMap "
        f"{watched:.1f} frames/s; ratio {watched / alone:.3f} (target >= 0.90)"
    )


if __name__ == "__main__":
    main()
