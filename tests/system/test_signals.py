"""Ctrl-C (SIGINT) and SIGTERM stop every edgeloop command promptly, with every process it
started: the whole demo in the middle of a scan, and the servers it is made of."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from p4p.client.thread import Context

from edgeloop import tiled_runs
from edgeloop.app.processes import ManagedProcess
from edgeloop.app.tiled_server import wait_ready
from edgeloop.config import Config
from edgeloop.scanfile import list_scans
from edgeloop.waiting import wait_until
from tests.kit.env import TEST_ENV, free_port, random_prefix
from tests.kit.servers import System, small_config
from tests.kit.waiting import wait_process_gone

pytestmark = [pytest.mark.timeout(300)]


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _assert_all_gone(procs: list[psutil.Process], timeout: float = 5.0) -> None:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive if p.is_running()]


def _wait_for_line(log, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def test_ctrl_c_during_a_demo_scan_stops_the_demo_and_all_its_processes(tmp_path):
    out, log = tmp_path / "demo", tmp_path / "demo.log"
    env = dict(os.environ, **TEST_ENV, EDGELOOP_BEAMLINE_CA_PORT=str(free_port()))
    prefix = random_prefix("c")
    args = ["demo", "--out", str(out), "--prefix", prefix, "--points", "400"]
    args += ["--rate-hz", "20"]  # a fly scan of 20 s
    with open(log, "w") as sink:
        demo = subprocess.Popen(
            [sys.executable, "-m", "edgeloop.app.cli", *args, "--epochs", "1"],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    children = []
    try:
        _wait_for_line(log, "ptycho_fly_scan: 400 points", demo, timeout=120)
        with Context("pva", nt=False) as ctx:  # well inside the scan: 40 of its 400 frames in
            wait_until(
                lambda: ctx.get(f"{prefix}edge:FramesIn", timeout=5)["value"] >= 40,
                60,
                "40 frames at the edge",
                poll=0.2,
                detail=lambda: log.read_text()[-2000:],
            )
        children = _descendants(demo.pid)
        assert len(children) >= 4  # ioc (+ its ML IOC), edge, retrain-service
        t0 = time.monotonic()
        demo.send_signal(signal.SIGINT)
        rc = demo.wait(20)
        assert time.monotonic() - t0 < 20
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        for child in children:  # servers run in sessions of their own: never leave one
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert "Deferred pause" not in text
    _assert_all_gone(children)
    # the interrupted run was aborted cleanly: bluesky collected the frames flown so far,
    # and the run, stored in the demo's Tiled server, points at them in the detector's
    # file, marked as aborted (read through the server, started again on its catalog)
    assert not list_scans(out / "data")  # no run entries: runs live in Tiled
    cfg = Config.load(out / "config.json")
    server = ManagedProcess("tiled", ["tiled", "--config", str(out / "config.json")],
                            tmp_path / "tiled.log", env=TEST_ENV)  # fmt: skip
    try:
        wait_ready(cfg, 120, server)
        client = tiled_runs.connect(cfg.tiled, cfg.data_path)
        (run,) = client.values()
        data = tiled_runs.read_run(tiled_runs.run_ref(client, run.metadata["start"]["uid"]), run)
    finally:
        server.stop()
    assert data["exit_status"] == "abort" and 0 < data["num_events"] < 400
    assert len(data["frames"]) == data["num_events"]


def test_sigterm_stops_each_server_and_what_it_started(tmp_path):
    cfg, path = small_config(tmp_path, random_prefix("t"))
    ca_port = free_port()
    servers = System(cfg, path, tmp_path / "logs", env={"EDGELOOP_BEAMLINE_CA_PORT": str(ca_port)})
    try:
        servers.start("ioc", "--simulate", ready_pv="ml:Status")
        # the ML IOC starts once the beamline's CA server listens: its ml:Status answering
        # means a CA client (caproto's caget here) finds the detector at once
        caget = [
            str(Path(sys.executable).with_name("caproto-get")),
            "--no-repeater",
            "--timeout",
            "2",
        ]
        env = dict(os.environ, EPICS_CA_ADDR_LIST=f"127.0.0.1:{ca_port}")
        pv = f"{cfg.prefix}det:cam1:Acquire_RBV"
        got = subprocess.run([*caget, pv], capture_output=True, text=True, env=env, timeout=30)
        assert got.returncode == 0 and pv in got.stdout, got.stdout + got.stderr
        servers.start("edge", ready_pv="edge:ModelVersion")
        servers.start("retrain-service")  # ready once it beats: its monitors are connected
        for name in ("retrain-service", "edge", "ioc"):
            proc = servers.procs[name].proc
            children = _descendants(proc.pid)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 143, servers.procs[name].output()[-3000:]
            assert time.monotonic() - t0 < 20
            _assert_all_gone(children)
            if name == "ioc":
                assert children, "the ML IOC runs as the ioc command's child"
    finally:
        servers.stop()


INNER_TEST = """
import subprocess, sys, time
from pathlib import Path
import pytest

pytestmark = pytest.mark.system  # it starts a process


@pytest.fixture
def server():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                            start_new_session=True)
    Path(__file__).with_name("server.pid").write_text(str(proc.pid))
    yield
    proc.terminate()
    proc.wait(10)


def test_long(server):
    time.sleep(600)  # until the outer test's SIGTERM
"""


def test_sigterm_to_the_test_run_stops_the_servers_its_fixtures_started(tmp_path):
    """A CI timeout or a stopped job sends pytest SIGTERM: the fixtures' teardown still
    stops the servers they started in sessions of their own (tests/conftest.py)."""
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    pid_file = tmp_path / "server.pid"
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-p", "no:cacheprovider"]
    run = subprocess.Popen(
        [*cmd, str(tmp_path / "test_inner.py")],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_until(lambda: pid_file.exists() or run.poll() is not None, 60, "the inner fixture")
        assert pid_file.exists(), run.communicate()[0][-3000:]
        server = int(pid_file.read_text())
        run.send_signal(signal.SIGTERM)
        output = run.communicate(timeout=60)[0]
        assert "KeyboardInterrupt" in output, output[-3000:]
        assert wait_process_gone(server), f"the fixture's server {server} was left running"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        if pid_file.exists() and psutil.pid_exists(server := int(pid_file.read_text())):
            psutil.Process(server).kill()  # left behind by a failure: not by the next test
