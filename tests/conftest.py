"""Fixtures for both tiers: the tests' EPICS settings (kept on loopback, and unchanged by any
test), the check that a test and a module leave no thread or process running, a RunEngine,
and the servers a module shares (the whole loop for the session, an edge fed by a SharedPV).

``tests/unit`` starts no process (a test there that calls ``subprocess.Popen`` fails);
``tests/system`` starts whole processes, and its tests carry the ``system`` marker. The
helpers both use are the importable kit, ``tests/kit``."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.kit.env import TEST_ENV, random_prefix
from tests.kit.leaks import SESSION_PIDS, LeakCheck
from tests.kit.runs import run_engine
from tests.kit.servers import small_config, whole_system

SYSTEM_TIER = Path(__file__).resolve().parent / "system"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SYSTEM_TIER in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.system)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request, monkeypatch):
    """A unit test runs in this process, its servers isolated in it: no Python or server
    process of its own (a short command such as ``git`` is allowed)."""
    if request.node.get_closest_marker("system") is None:
        start = subprocess.Popen.__init__

        def refuse_python(self, args, *a, **k):
            program = Path(str(args[0] if isinstance(args, list | tuple) else args).split()[0])
            if program.parent == Path(sys.executable).parent or "python" in program.name:
                raise AssertionError(f"a unit test started {args!r}: it belongs in tests/system")
            start(self, args, *a, **k)

        monkeypatch.setattr(subprocess.Popen, "__init__", refuse_python)
    yield


def pytest_configure(config):
    os.environ.update(TEST_ENV)  # before any EPICS client reads its settings
    from ophyd.signal import EpicsSignalBase

    # as the profiles edgeloop writes do, before any test makes a signal: ophyd's 1 s to
    # connect a lazy signal (cam1:Acquire_RBV, say) is short on a loaded machine
    EpicsSignalBase.set_defaults(connection_timeout=10.0)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_like_ctrl_c)


def _stop_like_ctrl_c(signum, frame):
    """SIGTERM (a CI timeout, a stopped job) stops the run as Ctrl-C does, so the fixtures'
    teardown stops the servers they started in sessions of their own; by default SIGTERM
    ends pytest at once and leaves them running. A second SIGTERM ends it at once."""
    signal.signal(signum, signal.SIG_DFL)
    raise KeyboardInterrupt("SIGTERM")


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


@pytest.fixture
def RE():
    with run_engine() as engine:
        yield engine


@pytest.fixture(scope="session")
def system(tmp_path_factory, request):
    """The whole loop, shared by the tests of test_loop.py."""
    with whole_system(tmp_path_factory.mktemp("system"), "s", request, "beamline") as sys_:
        SESSION_PIDS.update(proc.proc.pid for proc in sys_.procs.values())
        yield sys_


@pytest.fixture(scope="module")
def fed_edge(tmp_path_factory):
    """An edge server in this process on a private network, fed by a p4p SharedPV this
    fixture owns: (tests.kit.isolated.IsolatedEdge, source)."""
    from tests.kit.isolated import IsolatedEdge

    tmp = tmp_path_factory.mktemp("fed")
    cfg, _ = small_config(tmp, random_prefix("f"))
    edge = IsolatedEdge(cfg)
    try:
        yield edge, edge.source
    finally:
        edge.close()


@pytest.fixture
def no_gpu(monkeypatch):
    """This host as one without a GPU or TensorRT, whatever it has."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt: ImportError
