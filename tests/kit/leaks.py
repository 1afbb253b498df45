"""What a test leaves running: ``LeakCheck`` (threads and child processes alive now that were
not at the start), less what libraries keep by design (``LONG_LIVED``) and the processes of
session fixtures (``SESSION_PIDS``)."""

import sys
import threading
import time

import psutil

# what a library starts once per process and keeps by design (processes by command line,
# threads by the module of their target)
LONG_LIVED = (
    "multiprocessing.resource_tracker",
    "multiprocessing.forkserver",
    "globus_compute_sdk.sdk.executor",
    "tqdm._monitor",
)


# processes of session fixtures: they outlive the module that first asked for them
SESSION_PIDS: set[int] = set()


def _children() -> dict[int, str]:
    """This process's own children (a server's workers are that server's to stop)."""
    alive = {}
    for proc in psutil.Process().children():
        if proc.pid in SESSION_PIDS:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.cmdline())
        except psutil.NoSuchProcess:
            continue
        if not any(name in cmdline for name in LONG_LIVED):
            alive[proc.pid] = cmdline[:160]
    return alive


def _process_wide_threads() -> set[int]:
    """Threads a library starts once per process and keeps by design: ophyd's dispatcher,
    p4p's default work queues (SharedPV callbacks), tqdm's monitor, dask's default pool (a
    Tiled client's array reads), and the thread
    globus_compute_sdk starts on import to shut its executors down at exit."""
    keep = {
        t.ident
        for t in threading.enumerate()
        if getattr(getattr(t, "_target", None), "__module__", "") in LONG_LIVED
        or type(t).__module__ in LONG_LIVED
    }
    ophyd = sys.modules.get("ophyd")
    dispatcher = ophyd.cl.get_dispatcher() if ophyd is not None else None
    if dispatcher is not None:
        threads = (*dispatcher._threads.values(), dispatcher._debug_monitor_thread)
        keep |= {t.ident for t in threads}
    dask_threaded = sys.modules.get("dask.threaded")  # Tiled's client reads arrays with it
    pool = getattr(dask_threaded, "default_pool", None)
    if pool is not None:
        keep |= {t.ident for t in pool._threads}
    p4p_util = sys.modules.get("p4p.util")
    if p4p_util is not None:
        queues = [q for q in p4p_util._defaultWorkQueue.W if q is not None]
        keep |= {t.ident for q in queues for t in q._T if t is not None}
    return keep


def _threads() -> dict[int, str]:
    keep = _process_wide_threads()
    return {t.ident: t.name for t in threading.enumerate() if t.is_alive() and t.ident not in keep}


class LeakCheck:
    """Threads and child processes alive now that were not at the start."""

    def __init__(self):
        self.threads, self.children = _threads(), _children()

    def left_behind(self, grace_s: float = 5.0) -> list[str]:
        deadline = time.monotonic() + grace_s
        while True:  # a stopped worker may take a moment to exit
            threads = {k: v for k, v in _threads().items() if k not in self.threads}
            children = {k: v for k, v in _children().items() if k not in self.children}
            if not (threads or children) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return [f"thread {name!r}" for name in threads.values()] + [
            f"process {pid}: {cmd}" for pid, cmd in children.items()
        ]
