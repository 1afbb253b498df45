"""The Queue Server runs edgeloop's plans (issue 23, item 4): ``edgeloop queueserver-profile``
written against a running loop, a real Redis server (Debian's ``redis-server``, loopback, a
port of its own) and ``start-re-manager`` on the profile; items submitted through
``bluesky-queueserver-api`` as an operator and as an admin.  The fly scan runs in the
manager's worker, the edge answers every frame, the RetrainTrigger the startup code
subscribed retrains from the run the worker recorded in Tiled; an operator may not touch
retraining, and an argument of the wrong type is refused before it is queued."""

import os
import shutil
import subprocess
import sys

import pytest

from edgeloop.app.processes import ManagedProcess
from edgeloop.app.queueserver_profile import manager_command
from edgeloop.registry import Registry
from edgeloop.waiting import wait_until
from tests.kit.env import DEADLINE_SLACK, free_port
from tests.kit.servers import whole_system

pytest.importorskip("bluesky_queueserver_api")
pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(not shutil.which("redis-server"), reason="needs Debian's redis-server"),
]


@pytest.fixture(scope="module")
def loop(tmp_path_factory, request):
    qs = tmp_path_factory.mktemp("qs")
    with whole_system(qs, "q", request, "second_beamline", tiled=True) as sys_:
        yield sys_


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    import redis as redis_client

    tmp = tmp_path_factory.mktemp("redis")
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = ManagedProcess("redis", [*args, "--dir", str(tmp)], tmp / "redis.log",
                          program=["redis-server"])  # fmt: skip
    try:
        client = redis_client.Redis(host="127.0.0.1", port=port)
        wait_until(lambda: _pings(client), 30 * DEADLINE_SLACK, f"redis on {port}")
        yield port
    finally:
        proc.stop()


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


@pytest.fixture(scope="module")
def manager(loop, redis, tmp_path_factory):
    """The profile written against the loop, and start-re-manager on it; the API's client."""
    from bluesky_queueserver_api.zmq import REManagerAPI

    tmp = tmp_path_factory.mktemp("profile")
    profile = tmp / "edgeloop-qs"
    cli = [sys.executable, "-m", "edgeloop.app.cli", "queueserver-profile", str(profile)]
    done = subprocess.run(
        [*cli, "--simulated", "--prefix", loop.prefix, "--config", str(loop.config_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, **loop.env),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    listed = (profile / "existing_plans_and_devices.yaml").read_text()
    assert "ptycho_fly_scan" in listed and "set_retraining_policy" in listed
    control, info = free_port(), free_port()
    command = manager_command(profile, control, info, redis)
    proc = ManagedProcess("re-manager", command[1:], tmp / "re-manager.log",
                          env=loop.env, program=command[:1])  # fmt: skip
    RM = REManagerAPI(
        zmq_control_addr=f"tcp://127.0.0.1:{control}", zmq_info_addr=f"tcp://127.0.0.1:{info}"
    )
    try:
        wait_until(lambda: _answers(RM), 60 * DEADLINE_SLACK, "the RE manager", 0.5,
                   lambda: proc.output()[-3000:])  # fmt: skip
        RM.environment_open()
        RM.wait_for_idle(timeout=300 * DEADLINE_SLACK)
        assert RM.status()["worker_environment_exists"], proc.output()[-3000:]
        yield RM, proc
    finally:
        try:
            RM.environment_close()
            RM.wait_for_idle(timeout=60)
        except Exception:
            pass
        RM.close()
        proc.stop()


def _answers(RM) -> bool:
    try:
        return RM.status()["manager_state"] == "idle"
    except Exception:
        return False


def test_an_operator_queues_a_fly_scan_the_edge_answers_and_it_retrains(loop, manager):
    from bluesky_queueserver_api import BPlan

    RM, proc = manager
    before = loop.counts()
    version = int(loop.value("edge:ModelVersion"))
    scan = BPlan("ptycho_fly_scan", "det", "stage", num=40, step=0.05, rate_hz=100.0)
    added = RM.item_add(scan, user="operator", user_group="primary")
    assert added["success"], added
    RM.queue_start()
    RM.wait_for_idle(timeout=300 * DEADLINE_SLACK)
    (item,) = RM.history_get()["items"]
    assert item["result"]["exit_status"] == "completed", (item["result"], proc.output()[-3000:])
    (run_uid,) = item["result"]["run_uids"]

    taken = lambda c: c["FramesIn"] + c["Repeats"]  # noqa: E731
    after = loop.settled(lambda c: taken(c) >= taken(before) + 40 and not c["InFlight"])
    assert after["FramesIn"] == after["FramesOut"] + after["Dropped"] + after["BadFrames"]
    assert after["FramesOut"] - before["FramesOut"] >= 39 and after["Dropped"] == 0

    # the startup code's RetrainTrigger asked; the service trained on the run in Tiled
    new = loop.wait_value("edge:ModelVersion", lambda v: v > version, 600)
    trained_on = Registry(loop.cfg.registry_path).meta(new)["trained_on"]
    assert [ref.rsplit("/", 1)[1] for ref in trained_on] == [run_uid]


def test_only_an_admin_touches_retraining_and_bad_arguments_are_refused(loop, manager):
    from bluesky_queueserver_api import BPlan

    RM, _ = manager
    RM.queue_clear()
    for plan in (BPlan("retrain", "ml"), BPlan("set_retraining_policy", "ml", enabled=True)):
        with pytest.raises(Exception, match="not allowed|not in the list of allowed"):
            RM.item_add(plan, user="operator", user_group="primary")
    with pytest.raises(Exception, match="num"):
        RM.item_add(
            BPlan("ptycho_fly_scan", "det", "stage", num="many"),
            user="operator",
            user_group="primary",
        )
    assert RM.queue_get()["items"] == []

    threshold = 0.123
    admin = BPlan("set_retraining_policy", "ml", enabled=False, threshold=threshold)
    assert RM.item_add(admin, user="beamline scientist", user_group="admin")["success"]
    RM.queue_start()
    RM.wait_for_idle(timeout=120 * DEADLINE_SLACK)
    assert RM.history_get()["items"][-1]["result"]["exit_status"] == "completed"
    assert loop.wait_value("ml:AutoThreshold", lambda v: abs(v - threshold) < 1e-9, 30)
