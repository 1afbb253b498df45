"""Frame sources the edge did not write, for the tests: pvapy's ``pvapy-ad-sim-server`` (a
pvDatabase server, the server library areaDetector's NDPluginPva uses) on loopback, and a
witness monitor that records what a source sent."""

import contextlib
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from p4p.client.thread import Context

from edgeloop.app.pvapy_source import AdSimServer
from edgeloop.waiting import wait_until


@dataclass
class Source:
    """A running pvapy-ad-sim-server; ``abandon()`` stops it at the end of the ``with``
    instead of waiting for it to finish its frames."""

    channel: str
    server: AdSimServer
    abandoned: bool = False

    def sending(self, ctx: Context) -> bool:
        return self.server.sending(ctx)

    def before_first_frame(self, ctx: Context, *ready, timeout: float = 30) -> bool:
        """Wait until every ``ready()`` holds; whether the server still held its frames
        back then, so that the clients ready by then see every frame it sends."""
        wait_until(lambda: all(r() for r in ready), timeout, "the test's clients to connect")
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
    with tempfile.TemporaryDirectory() as logs:
        for attempt in range(attempts):
            log = Path(logs) / f"source{attempt}.log"
            server = AdSimServer(
                channel, list(args), log, fps=fps, runtime=runtime, start_delay=start_delay
            )
            source = Source(channel, server)
            try:
                with Context("pva", nt=False) as ctx:
                    first = server.first_answer(ctx)
                if first == 0:  # the placeholder: the frames are still held back
                    yield source
                    if not source.abandoned:
                        status = server.wait_exit(start_delay + runtime + 30)
                        assert status == 0, server.output()
                    return
            finally:
                server.stop()
            start_delay *= 2
    raise AssertionError(f"{channel}: frames started before the channel answered, {attempts}x")


class Witness:
    """A p4p monitor on the source (a deep queue, not pipelined: a pvDatabase server sends a
    pipelined monitor each frame many times): the frames it received, each (uniqueId,
    timeStamp), and :meth:`sent`, what the source sent."""

    REQUEST = "field(uniqueId,timeStamp)record[queueSize=256]"

    def __init__(self, ctx: Context, pv: str):
        self.frames: list[tuple[int, tuple]] = []
        self.connected = threading.Event()
        self.sub = ctx.monitor(pv, self._on, request=self.REQUEST)

    def sent(self) -> set[int]:
        """The uniqueIds the source sent: pvapy-ad-sim-server numbers its frames 1, 2, ...,
        so every one up to the last received, even one this monitor lost on a loaded host."""
        return set(range(1, max((uid for uid, _ in self.frames), default=0) + 1))

    def _on(self, value):
        if isinstance(value, Exception):
            return
        self.connected.set()
        if value["uniqueId"]:
            ts = value["timeStamp"]
            self.frames.append((value["uniqueId"], (ts["secondsPastEpoch"], ts["nanoseconds"])))

    def close(self):
        self.sub.close()
