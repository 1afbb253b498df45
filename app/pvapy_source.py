"""pvapy's ``pvapy-ad-sim-server`` as a frame source that edgeloop did not write: a
pvDatabase server, the server library areaDetector's NDPluginPva uses, with the data
distributor.  ``AdSimServer`` is the one launcher the bench, the benchmarks and the tests use:
started on loopback as a process this object owns (stopped by PID), read by its uniqueId."""

from __future__ import annotations

import sys
from pathlib import Path

from p4p.client.thread import Context

from edgeloop.app.processes import ManagedProcess
from edgeloop.waiting import wait_until

AD_SIM = Path(sys.executable).with_name("pvapy-ad-sim-server")


class AdSimServer:
    """``pvapy-ad-sim-server -cn channel`` sending at ``fps`` for ``runtime`` seconds after
    holding its frames back ``start_delay`` seconds (``-dc``: frames are NTNDArrays with the
    data distributor's metadata); ``args``: its other options (``-nx``, ``-if``, ...)."""

    def __init__(
        self,
        channel: str,
        args: list[str],
        log_path: Path,
        *,
        fps: float,
        runtime: float,
        start_delay: float,
        shutdown_delay: float = 0.5,
    ):
        self.channel = channel
        options = ["-cn", channel, "-fps", f"{fps:g}", "-rt", f"{runtime:g}"]
        options += ["-std", f"{start_delay:g}", "-shd", f"{shutdown_delay:g}", "-dc", *args]
        self.proc = ManagedProcess(f"source {channel}", options, log_path, program=[str(AD_SIM)])

    def unique_id(self, ctx: Context, timeout: float = 5.0) -> int:
        return int(ctx.get(self.channel, request="field(uniqueId)", timeout=timeout)["uniqueId"])

    def sending(self, ctx: Context) -> bool:
        """Whether the server has sent a frame yet (uniqueId 0 is its placeholder)."""
        return self.unique_id(ctx) != 0

    def first_answer(self, ctx: Context, timeout: float = 30.0) -> int:
        """The channel's uniqueId once it answers; RuntimeError if the server exits first."""

        def answered():
            try:
                return (self.unique_id(ctx, timeout=0.5),)
            except TimeoutError:
                if not self.proc.alive():
                    raise RuntimeError(
                        f"pvapy-ad-sim-server exited:\n{self.proc.output()[-2000:]}"
                    ) from None
                return None

        return wait_until(answered, timeout, f"{self.channel} to answer")[0]

    def wait_sending(self, ctx: Context, timeout: float = 30.0) -> AdSimServer:
        """Once it publishes frames."""
        self.first_answer(ctx, timeout)
        wait_until(lambda: self.sending(ctx), timeout, f"frames on {self.channel}", 0.2)
        return self

    def wait_exit(self, timeout: float) -> int:
        """Its exit status once it has sent its frames and ended by itself."""
        self.proc.proc.wait(timeout)
        return self.proc.proc.returncode

    def output(self) -> str:
        return self.proc.output()

    def stop(self) -> None:
        self.proc.stop(timeout=10)
