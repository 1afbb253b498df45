"""``edgeloop edge --workers N`` and ``edgeloop edge --worker K`` (app layer).

``--workers N`` starts N worker processes (``edgeloop edge --worker K``, K = 1..N), each an
edge server on ``{prefix}edge:wK:*`` whose input the source's data distributor shares
between them (edge_pva/workers.py), and serves the one set of ``{prefix}edge:*`` PVs from
them (edge_pva/aggregate.py).  A worker that exits is reported (edge:Message, MAJOR) and
started again; one that keeps dying stops the edge with a non-zero exit, for its own
supervisor to restart, as a single edge does.  With ``--remote-workers`` none is started
here: each runs as ``edgeloop edge --worker K`` (same prefix) on its host, under that host's
supervisor.  A worker started here ends when this process does, however it ends.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from edgeloop.config import Config
from edgeloop.log import LOG_FORMAT

log = logging.getLogger(__name__)

PARENT_ENV = "EDGELOOP_EDGE_PARENT"  # set for a worker started here: the edge's PID


class WorkerPool:
    """Worker processes, each started again ``backoff_s`` after it exits; ``max_deaths``
    exits of one worker within ``window_s`` are fatal (SystemExit from ``check``)."""

    def __init__(
        self,
        n: int,
        command: Callable[[int], list[str]],
        on_exit: Callable[[int, int], None],
        max_deaths: int = 5,
        window_s: float = 60.0,
        backoff_s: float = 1.0,
    ):
        self.n, self.command, self.on_exit = n, command, on_exit
        self.max_deaths, self.window_s, self.backoff_s = max_deaths, window_s, backoff_s
        self.procs: dict[int, subprocess.Popen | None] = {}
        self._due: dict[int, float] = {}  # worker -> when to start it again
        self._deaths: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.restarts = 0

    def _spawn(self, k: int) -> None:
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        # its own session: a terminal's Ctrl-C reaches this process only, which stops it
        self.procs[k] = subprocess.Popen(self.command(k), env=env, start_new_session=True)
        log.info("worker %d started (pid %d)", k, self.procs[k].pid)

    def start(self) -> WorkerPool:
        for k in range(1, self.n + 1):
            self._spawn(k)
        return self

    def check(self) -> None:
        now = time.monotonic()
        for k, proc in list(self.procs.items()):
            if proc is None:
                if now >= self._due[k]:
                    self.restarts += 1
                    self._spawn(k)
                continue
            status = proc.poll()
            if status is None:
                continue
            log.error("worker %d (pid %d) exited with status %s", k, proc.pid, status)
            self.on_exit(k, status)
            deaths = self._deaths[k]
            deaths.append(now)
            while now - deaths[0] > self.window_s:
                deaths.popleft()
            if len(deaths) >= self.max_deaths:
                raise SystemExit(
                    f"edge stopped: worker {k} exited {len(deaths)} times in "
                    f"{self.window_s:.0f} s (last status {status})"
                )
            self.procs[k] = None
            self._due[k] = now + self.backoff_s

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to each worker by PID; SIGKILL to one still running after ``timeout``."""
        running = [p for p in self.procs.values() if p is not None and p.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop: killed", proc.pid)
                proc.kill()
                proc.wait()


def worker_args(args) -> list[str]:
    """The ``edgeloop edge`` options a worker is started with: this command's, less
    --workers."""
    out = ["--prefix", args.prefix, "--distributor", args.distributor]
    for flag, name in (
        ("--config", "config"),
        ("--data-dir", "data_dir"),
        ("--registry-dir", "registry_dir"),
        ("--input-pv", "input_pv"),
        ("--service-user", "service_user"),
    ):
        if getattr(args, name, None):
            out += [flag, getattr(args, name)]
    for flag, name in (("--operators", "operators"), ("--hosts", "hosts")):
        if getattr(args, name, None):
            out += [flag, ",".join(getattr(args, name))]
    return out + ["-v"] * args.verbose + ["-q"] * args.quiet


def run_workers(
    cfg: Config,
    n: int,
    input_pv: str | None,
    plugin: str,
    args: list[str],
    remote: bool = False,
) -> None:
    """The aggregate, and (unless ``remote``) the N workers, until interrupted."""
    from edgeloop.edge_pva.aggregate import EdgeAggregate

    aggregate = EdgeAggregate(cfg, n, input_pv, plugin).start()
    cli = [sys.executable, "-u", "-m", "edgeloop.app.cli", "edge"]
    pool = None
    try:
        if not remote:
            pool = WorkerPool(
                n, lambda k: [*cli, "--worker", str(k), *args], aggregate.worker_exited
            ).start()
        while True:
            if pool is not None:
                pool.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if pool is not None:
            pool.stop()
        aggregate.stop()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    log.warning("the edge that started this worker (pid %d) is gone: stopping", parent)
    os.kill(os.getpid(), signal.SIGTERM)


def serve_worker(cfg: Config, k: int, input_pv: str | None, plugin: str) -> None:
    """Worker ``k`` until interrupted (or, started by ``run_workers``, until its edge ends)."""
    from edgeloop.edge_pva.workers import worker_server

    for handler in logging.getLogger("edgeloop").handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT.replace("%(name)s", f"w{k} %(name)s")))
    parent = os.environ.get(PARENT_ENV)
    if parent:
        threading.Thread(
            target=_exit_with_parent, args=(int(parent),), name="parent-watch", daemon=True
        ).start()
    worker_server(cfg, k, input_pv, plugin).serve_forever()
