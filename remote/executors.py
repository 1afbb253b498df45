"""Executors for the retraining steps.  Any ``concurrent.futures.Executor`` works; the names
in configuration (``executor``, or a write to ``$(P)ml:Endpoint``) map to one here:

- ``local``: one spawned worker process on this machine (the default);
- ``parsl``: a Parsl ``HighThroughputExecutor`` (``LocalProvider`` here; Slurm / PBS
  through ``remote.parsl_config_file``, examples in ``remote/parsl_examples/``);
- ``globus-compute``: ``globus_compute_sdk.Executor`` on a Globus Compute endpoint;
- ``globus-flows``: the analysis and the training as one Globus Flow on that endpoint
  (remote/flows.py; the service builds it, it needs the whole configuration).

The tasks (``remote/tasks.py``) take and return small dicts of references and checksums, so
the same call runs on all three.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import runpy
import signal
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait

from edgeloop.config import RemoteConfig
from edgeloop.optional import require

log = logging.getLogger(__name__)

# The Globus Compute service refuses a task whose serialized function + arguments, or a
# result, exceeds 10 MB (documented limit); models and labels therefore travel by reference.
GLOBUS_COMPUTE_PAYLOAD_LIMIT = 10 * 1024 * 1024


class LocalExecutor(ProcessPoolExecutor):
    """One worker process, spawned (a fresh interpreter: no inherited server threads or
    sockets), that can be stopped in the middle of a task."""

    def __init__(self):
        super().__init__(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        self._workers: dict = {}  # pid -> Process, kept after the pool forgets a dead one

    @property
    def broken(self) -> bool:
        """A worker died (killed, crashed): the pool takes no more tasks.  Its own flag is
        set by its manager thread a moment after the death; the worker's sentinel at once."""
        sentinels = [proc.sentinel for proc in (self._processes or {}).values()]
        return bool(self._broken) or bool(sentinels and wait(sentinels, timeout=0))

    def submit(self, fn, /, *args, **kwargs):
        future = super().submit(fn, *args, **kwargs)
        self._workers.update(self._processes or {})  # the worker is spawned on demand
        return future

    def dead_worker(self) -> str | None:
        """How a worker of this pool ended, e.g. "the worker (pid 42) died: killed by signal
        9 (SIGKILL)"; None if none has."""
        for pid, proc in self._workers.items():
            if not wait([proc.sentinel], timeout=1.0):
                continue  # alive
            # the pool's manager thread may be reaping it: one waitpid wins, and the other
            # sees no exit status until the winner has stored it
            deadline = time.monotonic() + 1.0
            while proc.exitcode is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if proc.exitcode is not None:
                return f"the worker (pid {pid}) died: {exit_status(proc.exitcode)}"
        return None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop; with ``wait=False`` a running task's worker is terminated, not left to
        finish as an orphan."""
        if not wait:
            for proc in list((self._processes or {}).values()):
                proc.terminate()
        super().shutdown(wait=wait, cancel_futures=cancel_futures)


def parsl_config(cfg: RemoteConfig, run_dir: str | None = None):
    """The Parsl ``Config``: from ``remote.parsl_config_file`` (a Python file defining
    ``config``, e.g. remote/parsl_examples/slurm.py) or one ``HighThroughputExecutor`` on
    this machine (``LocalProvider``), both on loopback here."""
    require("parsl", "parsl")
    from parsl.config import Config as ParslConfig
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    if cfg.parsl_config_file:
        namespace = runpy.run_path(cfg.parsl_config_file)
        if not isinstance(namespace.get("config"), ParslConfig):
            raise ValueError(f"{cfg.parsl_config_file} must define `config`, a parsl Config")
        return namespace["config"]
    htex = HighThroughputExecutor(
        label="edgeloop",
        address="127.0.0.1",
        loopback_address="127.0.0.1",
        max_workers_per_node=cfg.parsl_workers,
        cores_per_worker=1,
        heartbeat_period=5,  # also how soon a dead worker is noticed (default 30 s)
        provider=LocalProvider(init_blocks=1, max_blocks=1, worker_init=cfg.parsl_worker_init),
    )
    return ParslConfig(executors=[htex], run_dir=run_dir or "runinfo", strategy="none")


class ParslExecutor(Executor):
    """``concurrent.futures`` face of a Parsl DataFlowKernel: ``submit`` runs ``fn`` as a
    Parsl python app and returns its AppFuture (a ``concurrent.futures.Future``)."""

    def __init__(self, config):
        from parsl.dataflow.dflow import DataFlowKernel

        # Parsl starts its interchange and worker pool as scripts from this environment's
        # bin/, as an activated venv would find them
        bindir = os.path.dirname(sys.executable)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        self.dfk = DataFlowKernel(config)
        self._label = config.executors[0].label

    def submit(self, fn, /, *args, **kwargs):
        from parsl.app.python import PythonApp

        app = PythonApp(fn, data_flow_kernel=self.dfk, executors=[self._label])
        return app(*args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if not self.dfk.cleanup_called:
            self.dfk.cleanup()  # stops the interchange and the worker pool


def exit_status(code: int) -> str:
    if code < 0:
        return f"killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exited with status {code}"


def lost_worker(executor, exc: BaseException) -> str | None:
    """Words for a task that failed because the process running it died, else None."""
    if isinstance(exc, BrokenProcessPool):
        lost = executor.dead_worker() if isinstance(executor, LocalExecutor) else None
        return lost or "its worker process died"
    if type(exc).__name__ == "WorkerLost":  # parsl.executors.high_throughput.errors
        return f"its Parsl worker died ({exc})"
    return None


def stoppable(executor) -> bool:
    """Whether shutting the executor down stops a task already running on it (the local
    worker is terminated; Parsl cancels its blocks, killing their workers); a Globus
    Compute task cannot be stopped from here."""
    return isinstance(executor, (LocalExecutor, ParslExecutor))


def globus_compute_executor(cfg: RemoteConfig) -> Executor:
    """``globus_compute_sdk.Executor`` for the configured endpoint.  Authentication is the
    SDK's: the tokens a login stored on this host (``globus-compute-endpoint login``,
    refreshed by the SDK) or client credentials in GLOBUS_COMPUTE_CLIENT_ID / _SECRET. With
    neither it fails at once: the SDK would prompt for a login, and the service's stdin is
    a pipe or a pty under procServ, so it would wait forever."""
    if not cfg.globus_endpoint_id:
        raise ValueError(
            "executor 'globus-compute' needs remote.globus_endpoint_id (the UUID "
            "`globus-compute-endpoint list` shows)"
        )
    require("globus_compute_sdk", "globus")
    from globus_compute_sdk import Client
    from globus_compute_sdk import Executor as ComputeExecutor
    from globus_compute_sdk.sdk.auth.globus_app import get_globus_app
    from globus_sdk import UserApp

    app = get_globus_app()
    client = Client(app=app, do_version_check=False)  # its scopes, asked of the app
    if isinstance(app, UserApp) and app.login_required():
        raise ValueError(
            "executor 'globus-compute': no Globus login stored on this host; run "
            "`globus-compute-endpoint login` once as this user (or set "
            "GLOBUS_COMPUTE_CLIENT_ID and GLOBUS_COMPUTE_CLIENT_SECRET)"
        )
    client.version_check()  # reaches the service now: a switch fails at once, not a task
    return ComputeExecutor(endpoint_id=cfg.globus_endpoint_id, client=client)


def make_executor(
    name: str, cfg: RemoteConfig | None = None, run_dir: str | None = None
) -> Executor:
    cfg = cfg or RemoteConfig()
    if name == "local":
        return LocalExecutor()
    if name == "parsl":
        return ParslExecutor(parsl_config(cfg, run_dir))
    if name == "globus-compute":
        return globus_compute_executor(cfg)
    raise ValueError(f"unknown executor {name!r}; available: {sorted(EXECUTORS)}")


EXECUTORS = ("local", "parsl", "globus-compute", "globus-flows")
