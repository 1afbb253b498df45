"""One ptychography step scan through ophyd v1 and through ophyd-async, on the simulated
beamline, alternating, measured in one run.

The simulated beamline (``edgeloop ioc --no-ml-ioc``) is started on a free loopback port;
``ptycho_scan`` runs with edgeloop's ophyd v1 devices (``make_devices``: AreaDetector,
EpicsMotor stage, resource/datum) and with its ophyd-async devices (``make_async_devices``:
ophyd-async's SimDetector with the HDF writer, Motor stage, stream_resource/stream_datum),
``--rounds`` times each; printed: seconds per scan (median), frames per second, and the ratio.

    python benchmarks/scan_paths.py [--points 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeloop.config import Config, pin_loopback
from edgeloop.waiting import wait_until


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        return udp.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="scan_paths_"))
    port = free_port()
    os.environ["EDGELOOP_BEAMLINE_CA_PORT"] = str(port)
    pin_loopback(force=True)
    os.environ["EPICS_CA_ADDR_LIST"] = f"127.0.0.1:{port}"
    cfg = Config(prefix="BENCH:", data_dir=str(tmp / "data"), registry_dir=str(tmp / "models"))
    cfg.dump(tmp / "config.json")
    command = [sys.executable, "-m", "edgeloop.app.cli", "ioc", "--no-ml-ioc"]
    command += ["--prefix", cfg.prefix, "--config", str(tmp / "config.json")]
    with open(tmp / "ioc.log", "w") as log:
        ioc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        from bluesky import RunEngine
        from caproto.sync.client import read

        from edgeloop.bluesky_plans import make_devices, ptycho_scan
        from edgeloop.bluesky_plans.async_devices import make_async_devices

        def up() -> bool:
            try:
                return bool(read(f"{cfg.prefix}det:cam1:Acquire", timeout=1))
            except TimeoutError:
                return False

        wait_until(up, 60, "the simulated beamline")
        engine = RunEngine({})
        paths = {
            "ophyd v1": make_devices(cfg.prefix, cfg.data_path / "v1", timeout=30),
            "ophyd-async": make_async_devices(cfg.prefix, cfg.data_path / "async", 30),
        }
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, (det, stage) in paths.items():
                start = time.perf_counter()
                engine(ptycho_scan(det, stage, num=args.points, step=0.05))
                seconds[name].append(time.perf_counter() - start)
    finally:
        ioc.terminate()
        ioc.wait(30)
    print(f"ptycho_scan of {args.points} points on the simulated beamline, {args.rounds} rounds")
    median = {name: statistics.median(times) for name, times in seconds.items()}
    for name, m in median.items():
        print(f"  {name:12s} {m:6.2f} s per scan  {args.points / m:6.1f} frames/s")
    print(f"  ophyd-async / ophyd v1 time: {median['ophyd-async'] / median['ophyd v1']:.2f}")


if __name__ == "__main__":
    main()
