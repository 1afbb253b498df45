"""Fixtures that own real servers on loopback: the simulated beamline + real ML IOC
(``edgeloop ioc``), the edge server, and the retraining service, each a subprocess stopped by
PID at the end, its output printed when a test fails.

Tests that start servers or worker processes carry the ``system`` marker (``pytest -m "not
system"`` runs the unit tests alone).  Every test, and every module with its fixtures, must
stop the threads and processes it started: a check here fails the test that left one."""

import contextlib
import os
import secrets
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from p4p.client.thread import Context

from edgeloop import ntnd
from edgeloop.app.processes import ManagedProcess, readiness, wait_for_pv
from edgeloop.config import BEAMLINE_CA_PORT, LOOPBACK_ENV, Config
from edgeloop.signing import create_key

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# what a library starts once per process and keeps by design (processes by command line,
# threads by the module of their target)
LONG_LIVED = (
    "multiprocessing.resource_tracker",
    "multiprocessing.forkserver",
    "globus_compute_sdk.sdk.executor",
    "tqdm._monitor",
)


# Two simulated beamlines on one host cannot share a CA port for unicast searches: a whole
# loop that runs beside the session's `system` serves its beamline on this one.
SECOND_BEAMLINE_CA_PORT = BEAMLINE_CA_PORT + 1
# test_area_detector.py's own IOCs (+2 is the soak test's)
AREA_DETECTOR_CA_PORTS = (BEAMLINE_CA_PORT + 3, BEAMLINE_CA_PORT + 4)
RUN_INDEX_CA_PORT = BEAMLINE_CA_PORT + 5  # test_run_index.py's IOC
TEST_ENV = dict(
    LOOPBACK_ENV,
    EPICS_CA_ADDR_LIST=" ".join(
        [
            LOOPBACK_ENV["EPICS_CA_ADDR_LIST"],
            *(
                f"127.0.0.1:{p}"
                for p in (SECOND_BEAMLINE_CA_PORT, *AREA_DETECTOR_CA_PORTS, RUN_INDEX_CA_PORT)
            ),
        ]
    ),
)


def pytest_configure(config):
    os.environ.update(TEST_ENV)  # before any EPICS client reads its settings


@pytest.fixture(autouse=True)
def _loopback_only():
    """Every test starts and ends with the tests' EPICS settings: clients a later test
    starts as subprocesses inherit them (a test that ran the demo's or the bench's
    ``pin_loopback(force=True)`` in process once hid the second beamline's CA port)."""
    for key, value in TEST_ENV.items():
        assert os.environ[key] == value, f"{key} must be {value!r} in tests"
    yield
    changed = {k: os.environ.get(k) for k, v in TEST_ENV.items() if os.environ.get(k) != v}
    os.environ.update(TEST_ENV)
    assert not changed, f"the test changed the EPICS settings: {changed}"


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
    p4p's default work queues (SharedPV callbacks), tqdm's monitor, and the thread
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


@pytest.fixture(autouse=True, scope="module")
def _module_leaves_nothing_running(request):
    """Set up before and torn down after the module's own fixtures."""
    check = LeakCheck()
    yield
    left = check.left_behind()
    assert not left, f"{request.module.__name__} left running: {left}"


@pytest.fixture(autouse=True)
def _test_leaves_nothing_running(request):
    check = LeakCheck()
    yield
    left = check.left_behind()
    assert not left, f"{request.node.nodeid} left running: {left}"


@contextlib.contextmanager
def run_engine():
    """A bluesky RunEngine whose event-loop thread is stopped afterwards."""
    from bluesky import RunEngine

    engine = RunEngine({})
    try:
        yield engine
    finally:
        if engine.state != "idle":
            engine.halt()
        # Each RunEngine runs its own event loop on a daemon thread: stop it and close it.
        loop, thread = engine.loop, getattr(engine, "_th", None)
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=5)
            if not loop.is_running():
                loop.close()


def run_plan(plan, docs: list | None = None) -> list[tuple[str, dict]]:
    """Run ``plan`` on a real RunEngine; its documents (into ``docs`` when given, so they
    are kept when the plan raises), each checked against its schema."""
    from event_model import DocumentNames, schema_validators

    docs = [] if docs is None else docs
    with run_engine() as RE:
        RE.subscribe(lambda name, doc: docs.append((name, doc)))
        RE(plan)
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    return docs


def of(docs, kind: str) -> list[dict]:
    """The documents of one kind."""
    return [doc for name, doc in docs if name == kind]


@pytest.fixture
def RE():
    with run_engine() as engine:
        yield engine


def random_prefix(tag: str) -> str:
    return f"T{tag}{secrets.token_hex(3)}:"


def small_config(tmp: Path, prefix: str) -> tuple[Config, Path]:
    cfg = Config(prefix=prefix, data_dir=str(tmp / "data"), registry_dir=str(tmp / "models"))
    cfg.train.epochs = 2
    cfg.train_hedm.epochs = 40
    cfg.train.recon_epochs = 8
    cfg.edge.stats_publish_s = 0.2
    cfg.edge.map_publish_s = 0.2
    cfg.security.signing_key_file = str(tmp / "signing.key")
    if not (tmp / "signing.key").exists():
        create_key(tmp / "signing.key")
    path = tmp / "config.json"
    cfg.dump(path)
    return cfg, path


class System:
    """Handles to a running set of servers."""

    def __init__(self, cfg: Config, config_path: Path, logs: Path, env: dict | None = None):
        self.cfg, self.config_path, self.logs = cfg, config_path, logs
        self.env = dict(TEST_ENV, **(env or {}))
        self.prefix = cfg.prefix
        self.procs: dict[str, ManagedProcess] = {}
        self.ctx = Context("pva", nt=False)

    def start(self, name: str, *extra: str, ready_pv: str | None = None, timeout: float = 90.0):
        """Start a server; ready once ``ready_pv`` answers (the retraining service: once it
        beats, processes.readiness)."""
        args = [name, "--prefix", self.prefix, "--config", str(self.config_path), *extra]
        pv, until = readiness(self.ctx, self.prefix, name, ready_pv)
        proc = ManagedProcess(name, args, self.logs / f"{name}.log", env=self.env)
        self.procs[name] = proc
        wait_for_pv(self.ctx, pv, timeout, proc, until)
        return proc

    def pv(self, name: str):
        return self.ctx.get(f"{self.prefix}{name}", timeout=5)

    def value(self, name: str):
        return self.pv(name)["value"]

    def wait_value(self, name: str, predicate, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            v = self.value(name)
            if predicate(v):
                return v
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.prefix}{name} = {v!r} after {timeout} s\n" + self.outputs()
                )
            time.sleep(0.1)

    def outputs(self) -> str:
        return "\n".join(f"----- {n} -----\n{p.output()[-4000:]}" for n, p in self.procs.items())

    def stop(self):
        self.ctx.close()
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        for name, proc in self.procs.items():
            assert proc.proc.returncode is not None, f"{name} still running"


@contextlib.contextmanager
def whole_system(tmp: Path, tag: str, request, beamline_ca_port: int = BEAMLINE_CA_PORT):
    """ioc (beamline + ML IOC) + edge + retrain-service, with small training settings."""
    cfg, path = small_config(tmp, random_prefix(tag))
    port = {"EDGELOOP_BEAMLINE_CA_PORT": str(beamline_ca_port)}
    sys_ = System(cfg, path, tmp / "logs", env=port)
    try:
        sys_.start("ioc", ready_pv="ml:Status")
        sys_.start("edge", ready_pv="edge:ModelVersion")
        sys_.start("retrain-service")
        yield sys_
    finally:
        failed = request.session.testsfailed
        sys_.stop()
        if failed:
            print(sys_.outputs())


@pytest.fixture(scope="session")
def system(tmp_path_factory, request):
    """The whole loop, shared by the tests of test_loop.py."""
    with whole_system(tmp_path_factory.mktemp("system"), "s", request) as sys_:
        SESSION_PIDS.update(proc.proc.pid for proc in sys_.procs.values())
        yield sys_


@pytest.fixture(scope="module")
def fed_edge(tmp_path_factory, request):
    """An edge server whose input is a p4p SharedPV this fixture owns: (System, source)."""
    from p4p.server import Server
    from p4p.server.thread import SharedPV

    tmp = tmp_path_factory.mktemp("fed")
    cfg, path = small_config(tmp, random_prefix("f"))
    source = SharedPV()
    server = Server(providers=[{f"{cfg.prefix}src:Image": source}])
    sys_ = System(cfg, path, tmp / "logs")
    try:
        sys_.start("edge", "--input-pv", f"{cfg.prefix}src:Image", ready_pv="edge:ModelVersion")
        yield sys_, source
    finally:
        sys_.stop()
        server.stop()
        if request.session.testsfailed:
            print(sys_.outputs())


def post(source, value):
    """Post a frame on a SharedPV, opening it with the first."""
    if source.isOpen():
        source.post(value)
    else:
        source.open(value)


def wait_process_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once the process has exited (gone, or a zombie not reaped yet by its parent)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


class Collector:
    """All updates of an NTNDArray PV (p4p monitor, pipelined so none are squashed)."""

    def __init__(self, ctx, pv):
        self.frames, self.lock = [], threading.Lock()
        self.connected = threading.Event()
        self.sub = ctx.monitor(pv, self._on, request="field()record[pipeline=true,queueSize=64]")

    def _on(self, value):
        if isinstance(value, Exception):
            return
        self.connected.set()
        if value["uniqueId"] > 0:  # 0: the placeholder
            with self.lock:
                self.frames.append(ntnd.decode(value))

    def _poll(self, done, timeout) -> list:
        """The frames so far, once ``done(frames)`` holds or at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                frames = list(self.frames)
            if done(frames) or time.monotonic() > deadline:
                return frames
            time.sleep(0.05)

    def wait(self, n, timeout=60):
        return self._poll(lambda frames: len(frames) >= n, timeout)

    def wait_ids(self, uids, timeout=60) -> dict:
        """The frames of these uniqueIds, once all have come (or at the timeout); answers to
        other frames, such as a late one to an earlier test, do not count."""
        wanted = set(uids)

        def pick(frames) -> dict:
            return {f.unique_id: f for f in frames if f.unique_id in wanted}

        return pick(self._poll(lambda frames: len(pick(frames)) == len(wanted), timeout))

    def close(self):
        self.sub.close()
