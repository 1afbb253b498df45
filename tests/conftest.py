"""Fixtures that own real servers on loopback: the simulated beamline + real ML IOC
(``edgeloop ioc``), the edge server, and the retraining service, each a subprocess stopped by
PID at the end, its output printed when a test fails."""

import os

from edgeloop.config import LOOPBACK_ENV, Config

os.environ.update(LOOPBACK_ENV)  # before any EPICS client library is imported

import secrets  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from p4p.client.thread import Context  # noqa: E402

from edgeloop.processes import ManagedProcess, wait_for_pv  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _loopback_only():
    for key, value in LOOPBACK_ENV.items():
        assert os.environ[key] == value, f"{key} must be {value!r} in tests"


def random_prefix(tag: str) -> str:
    return f"T{tag}{secrets.token_hex(3)}:"


def small_config(tmp: Path, prefix: str) -> tuple[Config, Path]:
    cfg = Config(prefix=prefix, data_dir=str(tmp / "data"), registry_dir=str(tmp / "models"))
    cfg.train.epochs = 2
    cfg.train_hedm.epochs = 40
    cfg.train.recon_epochs = 8
    cfg.edge.stats_publish_s = 0.2
    cfg.edge.map_publish_s = 0.2
    path = tmp / "config.json"
    cfg.dump(path)
    return cfg, path


class System:
    """Handles to a running set of servers."""

    def __init__(self, cfg: Config, config_path: Path, logs: Path):
        self.cfg, self.config_path, self.logs = cfg, config_path, logs
        self.prefix = cfg.prefix
        self.procs: dict[str, ManagedProcess] = {}
        self.ctx = Context("pva", nt=False)

    def start(self, name: str, *extra: str, ready_pv: str, timeout: float = 90.0):
        args = [name, "--prefix", self.prefix, "--config", str(self.config_path), *extra]
        proc = ManagedProcess(name, args, self.logs / f"{name}.log")
        self.procs[name] = proc
        wait_for_pv(self.ctx, f"{self.prefix}{ready_pv}", timeout, proc)
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
                raise TimeoutError(f"{self.prefix}{name} = {v!r} after {timeout} s\n"
                                   + self.outputs())
            time.sleep(0.1)

    def outputs(self) -> str:
        return "\n".join(f"----- {n} -----\n{p.output()[-4000:]}" for n, p in self.procs.items())

    def stop(self):
        self.ctx.close()
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        for name, proc in self.procs.items():
            assert proc.proc.returncode is not None, f"{name} still running"


@pytest.fixture(scope="session")
def system(tmp_path_factory, request):
    """ioc (beamline + ML IOC) + edge + retrain-service, with small training settings."""
    tmp = tmp_path_factory.mktemp("system")
    cfg, path = small_config(tmp, random_prefix("s"))
    sys_ = System(cfg, path, tmp / "logs")
    try:
        sys_.start("ioc", ready_pv="ml:Status")
        sys_.start("edge", ready_pv="edge:ModelVersion")
        sys_.start("retrain-service", ready_pv="ml:Status")
        yield sys_
    finally:
        failed = request.session.testsfailed
        sys_.stop()
        if failed:
            print(sys_.outputs())


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
