"""The real EPICS IOC alone: its access-security file decides who may write."""

import threading

import pytest
from p4p.client.thread import Context

from edgeloop.config import PolicyConfig, RetentionConfig, SecurityConfig
from edgeloop.ioc import softioc
from edgeloop.waiting import wait_until
from tests.kit.env import DEADLINE_SLACK, random_prefix

pytestmark = [pytest.mark.timeout(120)]


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


def test_policy_records_start_from_the_configuration_and_refuse_out_of_range_puts():

    prefix = random_prefix("q")
    policy = PolicyConfig(enabled=True, threshold=0.07, threshold_px=0.3, min_new_frames=99)
    proc = softioc.start(prefix, policy=policy)
    ctx = Context("pva", nt=False)
    try:
        get = lambda name: ctx.get(f"{prefix}{name}", timeout=10)  # noqa: E731
        assert get("ml:AutoRetrain")["value.index"] == 1
        assert get("ml:AutoThreshold")["value"] == pytest.approx(0.07)
        assert get("ml:AutoThresholdPx")["value"] == pytest.approx(0.3)
        assert get("ml:AutoMinFrames")["value"] == 99
        assert get("ml:AutoMinInterval")["value"] == 60
        # drive limits clip an out-of-range put, as an ao/longout record does
        ctx.put(f"{prefix}ml:AutoMinFrames", 0, timeout=5)
        assert get("ml:AutoMinFrames")["value"] == 1
        ctx.put(f"{prefix}ml:AutoThreshold", -1.0, timeout=5)
        assert get("ml:AutoThreshold")["value"] == 0
        # ml:Request posts every write, the same reason twice too: two requests
        seen, lock = [], threading.Lock()

        def on(value):
            with lock:
                seen.append(value["value"])

        sub = ctx.monitor(f"{prefix}ml:Request", on)
        try:
            # the subscription is live once its first value has arrived: a write before
            # that can be folded into the initial value (CI saw ['', 'again'] once)
            wait_until(lambda: len(seen) >= 1, 10 * DEADLINE_SLACK, "ml:Request's first value")
            for _ in range(2):
                ctx.put(f"{prefix}ml:Request", "again", timeout=5, wait=True)
            wait_until(
                lambda: seen.count("again") >= 2,
                5 * DEADLINE_SLACK,
                "two ml:Request updates",
                detail=lambda: repr(seen),
            )
            assert seen.count("again") == 2, seen
        finally:
            sub.close()
    finally:
        ctx.close()
        proc.terminate()
        proc.wait(10)
        proc.stdin.close()


def test_disk_free_raises_minor_and_major_below_the_configured_limits():
    """Issue 22 item 17: ml:DiskFree (posted by the service) alarms as a beamline's disk
    fills; its limits come from the configuration's [retention]."""
    prefix = random_prefix("d")
    proc = softioc.start(prefix, retention=RetentionConfig(disk_minor_gb=40, disk_major_gb=8))
    ctx = Context("pva", nt=False)
    try:
        severity = {}
        for free in (100.0, 20.0, 5.0):
            ctx.put(f"{prefix}ml:DiskFree", free, timeout=5)
            value = ctx.get(f"{prefix}ml:DiskFree", timeout=5)
            severity[free] = value["alarm.severity"]
            assert value["display.units"] == "GB"
        assert severity == {100.0: 0, 20.0: 1, 5.0: 2}
    finally:
        ctx.close()
        proc.terminate()
        proc.wait(10)
        proc.stdin.close()
