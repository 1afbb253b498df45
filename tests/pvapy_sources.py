"""Frame sources the edge did not write, for the tests: pvapy's ``pvapy-ad-sim-server`` (a
pvDatabase server, the server library areaDetector's NDPluginPva uses) on loopback, and a
witness monitor that records what a source sent."""

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

from p4p.client.thread import Context

AD_SIM = str(Path(sys.executable).with_name("pvapy-ad-sim-server"))


@contextlib.contextmanager
def ad_sim_server(
    channel: str, *args: str, fps: int = 50, runtime: float = 2.0, start_delay: float = 5.0
):
    """pvapy-ad-sim-server on loopback, stopped by PID; yields once its channel answers,
    while the start delay still holds the frames back, so clients made then see all."""
    cmd = [AD_SIM, "-cn", channel, "-fps", str(fps), "-rt", str(runtime)]
    proc = subprocess.Popen(
        [*cmd, "-std", str(start_delay), "-shd", "0.5", "-dc", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        with Context("pva", nt=False) as ctx:
            deadline = time.monotonic() + 30
            while True:
                try:
                    first = ctx.get(channel, request="field(uniqueId)", timeout=0.5)
                    break
                except TimeoutError:
                    assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        assert first["uniqueId"] == 0, "frames started before the test's clients connected"
        yield proc
        out, _ = proc.communicate(timeout=start_delay + runtime + 30)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()


class Witness:
    """A plain p4p monitor on the source: the frames it sent, each (uniqueId, timeStamp)."""

    def __init__(self, ctx: Context, pv: str):
        self.frames: list[tuple[int, tuple]] = []
        self.sub = ctx.monitor(pv, self._on, request="field(uniqueId,timeStamp)")

    def _on(self, value):
        if not isinstance(value, Exception) and value["uniqueId"]:
            ts = value["timeStamp"]
            self.frames.append((value["uniqueId"], (ts["secondsPastEpoch"], ts["nanoseconds"])))

    def close(self):
        self.sub.close()
