"""The loop's servers as subprocesses on loopback for the tests: ``small_config`` (a config
with small training settings and a signing key), ``System`` (starts ``edgeloop`` commands,
each ready by its PV or heartbeat, stopped by PID), ``whole_system`` (ioc + edge +
retrain-service)."""

import contextlib
from pathlib import Path

from p4p.client.thread import Context

from edgeloop.app.loop import Servers, edge_counts, settled_counts
from edgeloop.config import Config
from edgeloop.signing import create_key
from edgeloop.waiting import wait_until
from tests.kit.env import DEADLINE_SLACK, TEST_ENV, free_port, loop_ca_env, random_prefix


def small_config(tmp: Path, prefix: str) -> tuple[Config, Path]:
    cfg = Config(prefix=prefix, data_dir=str(tmp / "data"), registry_dir=str(tmp / "models"))
    cfg.tiled.enabled = False  # runs as files: a test of Tiled turns it on
    cfg.train.epochs = 2
    cfg.train_hedm.epochs = 40
    cfg.train.recon_epochs = 8
    # one: beside the loop's servers on a loaded machine two threads train many times slower
    cfg.train.threads = 1
    cfg.edge.stats_publish_s = 0.2
    cfg.edge.map_publish_s = 0.2
    cfg.security.signing_key_file = str(tmp / "signing.key")
    if not (tmp / "signing.key").exists():
        create_key(tmp / "signing.key")
    path = tmp / "config.json"
    cfg.dump(path)
    return cfg, path


class PvReader:
    """Reads of ``self.prefix``'s PVs through ``self.ctx``; ``outputs()`` says what the
    servers logged, for a failure's message."""

    ctx: Context
    prefix: str

    def pv(self, name: str):
        return self.ctx.get(f"{self.prefix}{name}", timeout=5 * DEADLINE_SLACK)

    def value(self, name: str):
        return self.pv(name)["value"]

    def counts(self, edge: str = "edge:") -> dict:
        """The counters of the edge ``edge`` (a worker's: ``edge:w1:``), each read once."""
        return edge_counts(self.ctx, self.prefix, edge)

    def settled(self, done=None, quiet_s: float = 0.5, timeout: float = 30) -> dict:
        """The edge's counters once they add up, ``done`` holds (by default: nothing in
        flight) and none moved for ``quiet_s``: a reading right after a test's last answer
        can lag its count by one post. The servers' logs come with a timeout."""
        done = done or (lambda c: c["InFlight"] == 0)
        try:
            return settled_counts(self.ctx, self.prefix, done, quiet_s, timeout * DEADLINE_SLACK)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.outputs()}") from None

    def wait_value(self, name: str, predicate, timeout: float):
        """The value of ``name`` once ``predicate`` holds for it; ``timeout`` is what an idle
        machine needs, stretched by ``DEADLINE_SLACK`` (the deadline only bounds how long a
        failing test takes)."""
        last = []

        def holds():
            last[:] = [self.value(name)]
            return predicate(last[0]) and (last[0],)  # a tuple: true even for a value of 0

        detail = lambda: f"{self.prefix}{name} = {last[0]!r}\n{self.outputs()}"  # noqa: E731
        return wait_until(holds, timeout * DEADLINE_SLACK, f"{self.prefix}{name}", 0.1, detail)[0]

    def outputs(self) -> str:
        return ""


class System(Servers, PvReader):
    """The loop's servers (edgeloop.app.loop.Servers) with the tests' EPICS settings, read
    through PvReader; ``stop`` checks each has exited."""

    def __init__(self, cfg: Config, config_path: Path, logs: Path, env: dict | None = None):
        super().__init__(cfg, config_path, logs, env=dict(TEST_ENV, **(env or {})))

    def stop(self):
        super().stop()
        for name, proc in self.procs.items():
            assert proc.proc.returncode is not None, f"{name} still running"


@contextlib.contextmanager
def whole_system(tmp: Path, tag: str, request, beamline: str, tiled: bool = False):
    """ioc (beamline + ML IOC) + edge + retrain-service, with small training settings; with
    ``tiled``, after an embedded Tiled server where runs are stored and found.

    ``beamline`` names the CA ports of ``tests.kit.env.LOOP_CA_PORTS`` this loop's two IOCs
    take: ``"beamline"`` is the session's loop, ``"second_beamline"`` a loop beside it. Two
    CA servers on one UDP port (SO_REUSEPORT) each get a share of the unicast searches, by
    a hash of the client's address: a client finds the PVs of one of them and never the
    other's, so two loops at once must not share either port."""
    cfg, path = small_config(tmp, random_prefix(tag))
    if tiled:
        cfg.tiled.enabled, cfg.tiled.port = True, free_port()
        cfg.dump(path)
    sys_ = System(cfg, path, tmp / "logs", env=loop_ca_env(beamline))
    try:
        if tiled:
            sys_.start_tiled()
        sys_.start("ioc", "--simulate", ready_pv="ml:Status")
        sys_.start("edge", ready_pv="edge:ModelVersion")
        sys_.start("retrain-service")
        yield sys_
    finally:
        failed = request.session.testsfailed
        sys_.stop()
        if failed:
            print(sys_.outputs())
