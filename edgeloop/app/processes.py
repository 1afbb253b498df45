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


def wait_for_pv(ctx: Context, name: str, timeout: float, proc: ManagedProcess | None = None):
    """Poll a PV until it reads; raise with the process output if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ctx.get(name, timeout=1.0)
        except Exception:
            if proc is not None and not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.output()[-3000:]}") from None
            if time.monotonic() > deadline:
                tail = proc.output()[-3000:] if proc else ""
                raise TimeoutError(
                    f"{name} did not answer within {timeout} s ({search_hint()})\n{tail}"
                ) from None
            time.sleep(0.2)
