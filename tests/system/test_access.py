"""Only the right people change what is served: the ML IOC's ACF (CA and PVA) and the edge's
own check on edge:LoadModel, exercised by real clients running as other Unix users."""

import dataclasses
import getpass
import json
import os
import pwd
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from p4p.client.thread import Context

from edgeloop.config import Config, SecurityConfig
from edgeloop.ioc import softioc
from tests.kit.env import KIT, TEST_ENV, free_port, random_prefix
from tests.kit.models import add_approved

OPERATOR = "edgeloop_op"  # a second account, created here when absent (never removed)
STRANGER = "nobody"  # an account that is neither operator nor service
ME = getpass.getuser()  # runs the servers; the service user
CLIENT = KIT / "access_client.py"
# TEST-NET-1 (RFC 5737): never the address of a client on this host
ELSEWHERE = "192.0.2.1"


# ---- real servers, real clients as other users -------------------------------------------
def other_accounts():
    if os.geteuid() != 0:
        pytest.skip("switching clients to other Unix users needs root")
    try:
        pwd.getpwnam(OPERATOR)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", OPERATOR], check=True)
    pwd.getpwnam(STRANGER)


class Servers:
    """An ML IOC serving CA on a port of its own (other IOCs on this host share 5064, and a
    unicast search reaches only one of them) and an edge server, in this process."""

    def __init__(self, tmp: Path, security: SecurityConfig):
        from edgeloop.edge_pva.server import EdgeServer

        self.cfg = Config(
            prefix=random_prefix("x"),
            data_dir=str(tmp / "data"),
            registry_dir=str(tmp / "models"),
            # keys (the gate's too) beside the test's files, never in ~/.edgeloop
            security=dataclasses.replace(security, signing_key_file=str(tmp / "signing.key")),
        )
        self.cfg.tiled.enabled = False  # the scans are files in data_dir
        self.p = self.cfg.prefix
        port = free_port()
        self.env = dict(
            TEST_ENV, EPICS_CA_SERVER_PORT=str(port), EPICS_CA_ADDR_LIST=f"127.0.0.1:{port}"
        )
        self.ioc = softioc.start(self.p, env=dict(os.environ, **self.env), security=security)
        self.edge = None
        self.ctx = Context("pva", nt=False)
        try:
            self.edge = EdgeServer(self.cfg, input_pv=f"{self.p}none:Image").start()
        except BaseException:
            self.close()
            raise

    def put(self, user: str, protocol: str, name: str, value) -> dict:
        """Write as ``user``, from a client process running as that user."""
        env = dict(self.env, USER=user, LOGNAME=user, PATH="/usr/bin:/bin", HOME="/")
        args = [sys.executable, str(CLIENT), user, protocol, self.p + name, json.dumps(value)]
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def value(self, name: str):
        return self.ctx.get(f"{self.p}{name}", timeout=5)["value"]

    def close(self):
        self.ctx.close()
        if self.edge is not None:
            self.edge.stop()
        self.ioc.terminate()
        self.ioc.wait(10)
        self.ioc.stdin.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Operators: a made-up name and, second in the list, the operator account (a comma
    that broke the list would drop it); hosts: this host by two names."""
    other_accounts()
    security = SecurityConfig(
        operators=("alice", OPERATOR), service_user=ME, hosts=("localhost", socket.gethostname())
    )
    s = Servers(tmp_path_factory.mktemp("access"), security)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("protocol", ["ca", "pva"])
def test_operators_control_and_only_the_service_writes_status(servers, protocol):
    for name, value in (("ml:Endpoint", "parsl"), ("ml:Abort", 1), ("ml:Retrain", 1)):
        assert servers.put(OPERATOR, protocol, name, value)["ok"], name
    assert servers.value("ml:Endpoint") == "parsl"
    for name, value in (("ml:Retrain", 0), ("ml:ModelVersion", 7), ("ml:Message", "hi")):
        assert servers.put(ME, protocol, name, value)["ok"], name
    assert servers.value("ml:ModelVersion") == 7
    for name, value in (("ml:Retrain", 1), ("ml:Rollback", 1), ("ml:Endpoint", "evil")):
        refused = servers.put(STRANGER, protocol, name, value)
        assert not refused["ok"], name
        assert "denied" in refused["error"] or "not permitted" in refused["error"]
    for name, value in (("ml:ModelVersion", 99), ("ml:Status", 6), ("ml:Message", "forged")):
        assert not servers.put(OPERATOR, protocol, name, value)["ok"], name
    assert servers.value("ml:Retrain")["index"] == 0
    assert servers.value("ml:Endpoint") == "parsl"
    assert servers.value("ml:ModelVersion") == 7
    assert servers.value("ml:Message") == "hi"


@pytest.mark.timeout(300)
def test_edge_load_model_only_for_operators(servers, caplog):
    from edgeloop.models import kind as model_kind
    from edgeloop.registry import Registry, model_to_bytes

    arch = servers.cfg.arch("ptychonn")
    data = model_to_bytes("ptychonn", arch, model_kind("ptychonn").build(**arch))
    registry, meta = Registry(servers.cfg.registry_path), {"kind": "ptychonn", "val_loss": 0.1}
    version = add_approved(registry, data, meta, servers.cfg.security)
    serving = servers.value("edge:ModelVersion")
    refused = servers.put(STRANGER, "pva", "edge:LoadModel", version)
    assert not refused["ok"]
    assert f"not permitted: user '{STRANGER}' is not an operator" in refused["error"]
    assert servers.value("edge:ModelVersion") == serving
    assert f"user '{STRANGER}' is not an operator" in caplog.text
    assert servers.edge.pvs["LoadModel"]._handler.access.refused == 1
    assert servers.put(OPERATOR, "pva", "edge:LoadModel", version) == {"ok": True, "error": ""}
    assert servers.value("edge:ModelVersion") == version


@pytest.mark.timeout(300)
def test_writes_from_hosts_not_listed_are_refused(tmp_path):
    other_accounts()
    security = SecurityConfig(operators=(OPERATOR,), service_user=ME, hosts=(ELSEWHERE,))
    s = Servers(tmp_path, security)
    try:
        for protocol in ("ca", "pva"):
            for user, name in ((OPERATOR, "ml:Retrain"), (ME, "ml:ModelVersion")):
                assert not s.put(user, protocol, name, 1)["ok"], (user, protocol, name)
        refused = s.put(OPERATOR, "pva", "edge:LoadModel", 1)
        assert f"host 127.0.0.1 is not one of {ELSEWHERE}" in refused["error"]
    finally:
        s.close()
