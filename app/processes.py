"""Start edgeloop servers as subprocesses that the caller owns, and wait until they answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from p4p.client.thread import Context

from edgeloop.config import LOOPBACK_ENV, search_hint

CLI = [sys.executable, "-u", "-m", "edgeloop.app.cli"]


class ManagedProcess:
    """``python -m edgeloop.app.cli <args>`` (or ``program <args>``) in its own process
    group; output to a log file; stopped by PID (SIGINT, then SIGTERM, then SIGKILL), then
    what is left of its group."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log_path: Path,
        env: dict | None = None,
        program: list[str] | None = None,
    ):
        self.name = name
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ)
        full_env.update(LOOPBACK_ENV)
        full_env.update(env or {})
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [*(program or CLI), *args],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,  # its own process group: stopped with whatever it starts
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        try:  # what it started and left behind (e.g. a worker in the middle of a task)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.stdin:
            self.proc.stdin.close()
        self._log.close()
        return self.proc.returncode


def wait_for_pv(
    ctx: Context, name: str, timeout: float, proc: ManagedProcess | None = None, until=None
):
    """Poll a PV until it reads (and ``until(value)`` holds); raise with the process output
    if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = ctx.get(name, timeout=1.0)
            if until is None or until(value):
                return value
        except Exception:
            pass
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.output()[-3000:]}")
        if time.monotonic() > deadline:
            tail = proc.output()[-3000:] if proc else ""
            what = "answer" if until is None else "answer as awaited"
            hint = search_hint()
            raise TimeoutError(f"{name} did not {what} within {timeout} s ({hint})\n{tail}")
        time.sleep(0.2)


def readiness(ctx: Context, prefix: str, name: str, ready_pv: str | None = None):
    """What says that the server ``name`` is up, as (PV, until) for wait_for_pv; call it
    before starting the server. The retraining service serves no PV of its own (the IOC
    serves ml:*), so it is up once ml:Heartbeat differs from what it reads now: the service
    starts beating last."""
    if name != "retrain-service":
        return f"{prefix}{ready_pv}", None
    heartbeat = f"{prefix}ml:Heartbeat"
    before = ctx.get(heartbeat, timeout=5)["value"]
    return heartbeat, lambda value: value["value"] != before
