"""EPICS network settings: the production commands use the user's EPICS environment, the demo
pins loopback whatever the shell holds, and a PV that cannot be reached is named together
with the address list searched."""

import time

import pytest
from conftest import random_prefix, small_config
from p4p.client.thread import Context

from edgeloop.app.processes import ManagedProcess
from edgeloop.config import LOOPBACK_ENV, pin_loopback, search_hint


def test_pin_loopback_keeps_the_callers_settings_unless_forced():
    shell = {"EPICS_PVA_ADDR_LIST": "10.1.2.255", "EPICS_CA_AUTO_ADDR_LIST": "YES"}
    kept = dict(shell)
    pin_loopback(kept)
    assert kept["EPICS_PVA_ADDR_LIST"] == "10.1.2.255"  # an IPython session's own setting
    assert kept["EPICS_PVA_AUTO_ADDR_LIST"] == "NO"
    pinned = dict(shell)
    pin_loopback(pinned, force=True)  # the demo
    assert {k: pinned[k] for k in LOOPBACK_ENV} == LOOPBACK_ENV
    assert search_hint("ca", {"EPICS_CA_ADDR_LIST": "a b"}) == (
        "searched EPICS_CA_ADDR_LIST='a b', EPICS_CA_AUTO_ADDR_LIST=YES"
    )


@pytest.mark.system
@pytest.mark.timeout(120)
def test_edge_uses_the_users_address_list_and_names_an_unreachable_input(tmp_path):
    cfg, path = small_config(tmp_path, random_prefix("n"))
    missing = f"{cfg.prefix}nowhere:Image"
    addresses = "127.0.0.1 127.0.0.2"  # the user's list (loopback only, as tests must be)
    proc = ManagedProcess(
        "edge",
        ["edge", "--prefix", cfg.prefix, "--config", str(path), "--input-pv", missing],
        tmp_path / "edge.log",
        env={"EPICS_PVA_ADDR_LIST": addresses},
    )
    ctx = Context("pva", nt=False)
    try:
        expected = f"input {missing} not connected for 5 s; searched EPICS_PVA_ADDR_LIST="
        message, deadline = "", time.monotonic() + 30
        while expected not in message and time.monotonic() < deadline:
            try:
                message = ctx.get(f"{cfg.prefix}edge:Message", timeout=1)["value"]
            except TimeoutError:
                assert proc.alive(), proc.output()
            time.sleep(0.2)
        assert f"{expected}{addresses!r}, EPICS_PVA_AUTO_ADDR_LIST=NO" in message, proc.output()
        assert ctx.get(f"{cfg.prefix}edge:Message")["alarm.severity"] == 1
    finally:
        ctx.close()
        proc.stop()
