"""The retraining service dies mid-run: the real ML IOC notices by itself (no heartbeat for
5 s: ml:Service "No heartbeat", MAJOR), and a restarted service clears the alarm."""

import time

import pytest
from p4p.client.thread import Context

from edgeloop.app.processes import ManagedProcess
from edgeloop.ioc import softioc
from tests.kit.env import DEADLINE_SLACK, random_prefix
from tests.kit.servers import small_config

pytestmark = [pytest.mark.timeout(180)]
MAJOR = 2


@pytest.fixture
def ml_ioc():
    prefix = random_prefix("h")
    proc = softioc.start(prefix)
    try:
        yield prefix
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
        proc.stdin.close()


def _wait_service(ctx, prefix, state: str, timeout: float) -> tuple[float, int]:
    """Seconds until ml:Service reads ``state``, and its severity then."""
    t0 = time.monotonic()
    while True:
        value = ctx.get(f"{prefix}ml:Service", timeout=5)
        if value["value.choices"][value["value.index"]] == state:
            return time.monotonic() - t0, value["alarm.severity"]
        assert time.monotonic() - t0 < timeout, f"ml:Service not {state!r} after {timeout} s"
        time.sleep(0.2)


def test_a_dead_service_raises_the_alarm_and_a_new_one_clears_it(ml_ioc, tmp_path):
    prefix = ml_ioc
    _, path = small_config(tmp_path, prefix)
    args = ["retrain-service", "--prefix", prefix, "--config", str(path)]
    ctx = Context("pva", nt=False)
    services = []

    def start_service() -> None:
        services.append(ManagedProcess("svc", args, tmp_path / f"svc{len(services)}.log"))
        _, severity = _wait_service(ctx, prefix, "Running", 30 * DEADLINE_SLACK)
        assert severity == 0 and ctx.get(f"{prefix}ml:HeartbeatAge")["value"] < 5

    try:
        _, severity = _wait_service(ctx, prefix, "No heartbeat", 10 * DEADLINE_SLACK)  # none yet
        assert severity == MAJOR
        start_service()
        ctx.put(f"{prefix}ml:Status", {"value.index": 3})  # "Training", as in the middle of a run

        services[-1].proc.kill()  # SIGKILL: nothing is cleaned up, ml:Status stays "Training"
        seconds, severity = _wait_service(ctx, prefix, "No heartbeat", 15)
        assert severity == MAJOR and seconds < 5 + 3
        age = ctx.get(f"{prefix}ml:HeartbeatAge")
        assert age["value"] >= 5 and age["alarm.severity"] == MAJOR
        status = ctx.get(f"{prefix}ml:Status")
        assert status["value.choices"][status["value.index"]] == "Training"

        start_service()  # a new service: the alarm clears
        status = ctx.get(f"{prefix}ml:Status")
        assert status["value.choices"][status["value.index"]] == "Idle"
    finally:
        ctx.close()
        for service in services:
            service.stop()
