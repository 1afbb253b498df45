"""The real EPICS IOC alone: its access-security file decides who may write."""

import pytest
from conftest import random_prefix
from p4p.client.thread import Context

from edgeloop.config import SecurityConfig
from edgeloop.ioc import softioc

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]


@pytest.fixture
def locked_ioc():
    """ML IOC whose operators and service are another user: this user may only read."""
    prefix = random_prefix("m")
    nobody = SecurityConfig(operators=("edgeloop_nobody",), service_user="edgeloop_nobody")
    proc = softioc.start(prefix, security=nobody)
    try:
        yield prefix
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdin.close()


def test_access_security_refuses_writes_from_other_users(locked_ioc):
    ctx = Context("pva", nt=False)
    try:
        assert ctx.get(f"{locked_ioc}ml:Status", timeout=10)["value.index"] == 0
        for name, value in (("ml:Retrain", 1), ("ml:Message", "hello"), ("ml:ModelVersion", 3)):
            with pytest.raises(Exception, match="not permitted"):
                ctx.put(f"{locked_ioc}{name}", value, timeout=5)
        assert ctx.get(f"{locked_ioc}ml:Retrain")["value.index"] == 0
        assert ctx.get(f"{locked_ioc}ml:ModelVersion")["value"] == 0
    finally:
        ctx.close()


def test_ioc_start_failure_reports_its_output(tmp_path, monkeypatch):
    monkeypatch.setattr(softioc, "db_dir", lambda: tmp_path)  # no ml.db there
    with pytest.raises(RuntimeError, match="did not start"):
        softioc.start(random_prefix("f"), timeout=20)
