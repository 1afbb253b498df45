"""EPICS network settings: the production commands use the user's EPICS environment, the demo
pins loopback whatever the shell holds, and a PV that cannot be reached is named together
with the address list searched."""

import time

import pytest
from p4p.client.thread import Context

from edgeloop.app.processes import ManagedProcess
from tests.kit.env import random_prefix
from tests.kit.servers import small_config


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
