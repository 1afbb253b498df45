"""Frame sources the edge did not write, for the tests: pvapy's ``pvapy-ad-sim-server`` (a
pvDatabase server, the server library areaDetector's NDPluginPva uses) on loopback, and a
witness monitor that records what a source sent."""

import contextlib
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from p4p.client.thread import Context

AD_SIM = str(Path(sys.executable).with_name("pvapy-ad-sim-server"))


@dataclass
class Source:
    """A running pvapy-ad-sim-server; ``abandon()`` stops it at the end of the ``with``
    instead of waiting for it to finish its frames."""

    channel: str
    proc: subprocess.Popen
    abandoned: bool = False

    def sending(self, ctx: Context) -> bool:
        """Whether the server has sent a frame yet (uniqueId 0 is its placeholder)."""
        return ctx.get(self.channel, request="field(uniqueId)", timeout=5)["uniqueId"] != 0

    def before_first_frame(self, ctx: Context, *ready, timeout: float = 30) -> bool:
        """Wait until every ``ready()`` holds; whether the server still held its frames
        back then, so that the clients ready by then see every frame it sends."""
        deadline = time.monotonic() + timeout
        while not all(r() for r in ready):
            assert time.monotonic() < deadline, "the test's clients did not connect in time"
            time.sleep(0.05)
        return not self.sending(ctx)

    def abandon(self) -> None:
        self.abandoned = True


@contextlib.contextmanager
def ad_sim_server(
    channel: str,
    *args: str,
    fps: int = 50,
    runtime: float = 2.0,
    start_delay: float = 5.0,
    attempts: int = 3,
):
    """pvapy-ad-sim-server on loopback, stopped by PID; yields a ``Source`` once its channel
    answers while the start delay still holds the frames back.  A server slower to answer
    than its start delay (a loaded machine) is stopped and started again with twice the
    delay, up to ``attempts`` times."""
    for _ in range(attempts):
        source = Source(channel, _start(channel, args, fps, runtime, start_delay))
        try:
            with Context("pva", nt=False) as ctx:
                first = _first_value(ctx, source)
            if first["uniqueId"] == 0:  # the placeholder: the frames are still held back
                yield source
                if not source.abandoned:
                    out, _ = source.proc.communicate(timeout=start_delay + runtime + 30)
                    assert source.proc.returncode == 0, out
                return
        finally:
            _stop(source.proc)
        start_delay *= 2
    raise AssertionError(f"{channel}: frames started before the channel answered, {attempts}x")


def _start(channel: str, args: tuple, fps: int, runtime: float, delay: float):
    cmd = [AD_SIM, "-cn", channel, "-fps", str(fps), "-rt", str(runtime), "-std", str(delay)]
    return subprocess.Popen(
        [*cmd, "-shd", "0.5", "-dc", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _first_value(ctx: Context, source: Source, timeout: float = 30):
    """The channel's uniqueId once it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ctx.get(source.channel, request="field(uniqueId)", timeout=0.5)
        except TimeoutError:
            alive = source.proc.poll() is None
            assert alive and time.monotonic() < deadline, source.proc.stdout.read()


def _stop(proc: subprocess.Popen) -> None:
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
        self.connected = threading.Event()
        self.sub = ctx.monitor(pv, self._on, request="field(uniqueId,timeStamp)")

    def _on(self, value):
        if isinstance(value, Exception):
            return
        self.connected.set()
        if value["uniqueId"]:
            ts = value["timeStamp"]
            self.frames.append((value["uniqueId"], (ts["secondsPastEpoch"], ts["nanoseconds"])))

    def close(self):
        self.sub.close()
