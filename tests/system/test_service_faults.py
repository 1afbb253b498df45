"""Faults the retraining service survives, injected for real: the ML IOC SIGKILLed and
started again, a training worker SIGKILLed (local pool and Parsl), and ml:Abort in every
state.  Each runs the service in this process against its own real ML IOC and edge server
(test_remote.Loop); scans are written by the real RunEngine."""

import os
import signal
import time

import psutil
import pytest

from edgeloop.registry import Registry
from edgeloop.waiting import holds_for, wait_until
from tests.kit.loops import hedm_scan
from tests.kit.waiting import wait_process_gone

pytestmark = [pytest.mark.timeout(600)]


def press(lp, button):
    lp.ctx.put(f"{lp.p}{button}", {"value.index": 1}, timeout=5)


def wait_idle(service, timeout=60):
    """Until the service has finished with its last trigger (and made its executor ready)."""
    wait_until(lambda: not service._busy.locked(), timeout, "the service to be idle", 0.1)


def wait_value(lp, name, expected, timeout=30):
    wait_until(lambda: lp.value(name) == expected, timeout, f"{name} = {expected!r}", 0.1)


def test_ml_ioc_restart_gets_the_service_state_back_and_keeps_its_executor(loop):  # noqa: F811
    from edgeloop.ioc import softioc
    from edgeloop.remote.executors import LocalExecutor
    from edgeloop.remote.service import RetrainService

    lp = loop()
    # the service uses "parsl" (not the IOC's default "local"); a local pool stands in for it
    lp.cfg.executor = "parsl"
    executor = LocalExecutor()
    service = lp.service = RetrainService(lp.cfg, executor=executor).start()
    wait_value(lp, "ml:Endpoint", "parsl")
    service.pvs.put("ml:ModelVersion", 7)
    service.pvs.put("ml:ValLoss", 0.125)
    service.pvs.publish_timings({"staging_s": 1.5, "training_s": 12.5, "end_to_end_s": 30.0})
    service.pvs.status("Error", "training failed: a message to keep")
    state = {
        "ml:Endpoint": "parsl",
        "ml:ModelVersion": 7,
        "ml:ValLoss": 0.125,
        "ml:StagingTime": 1.5,
        "ml:TrainingTime": 12.5,
        "ml:EndToEndTime": 30.0,
        "ml:Message": "training failed: a message to keep",
    }
    assert {name: lp.value(name) for name in state} == state and lp.state() == "Error"

    old = lp.ioc
    os.kill(old.pid, signal.SIGKILL)
    assert old.wait(10) == -signal.SIGKILL
    old.stdin.close()
    lp.ioc = softioc.start(lp.p)
    assert lp.ioc.pid != old.pid

    for name, value in state.items():
        wait_value(lp, name, value)
    assert lp.state() == "Error"
    # a switch would begin within a second of the IOC's ml:Endpoint coming back
    holds_for(
        lambda: service.executor_name == "parsl" and service.executor is executor,
        1.0,
        "the service keeping its executor",
    )
    assert lp.value("ml:Endpoint") == "parsl"
    # its monitors are back too: a trigger is taken (and fails: there are no scans)
    assert lp.retrain(timeout=30) == "Error" and "no scans" in lp.value("ml:Message")


def test_local_worker_killed_mid_training_then_the_next_trigger_works(loop):  # noqa: F811
    lp = loop()
    hedm_scan(lp.cfg.data_path, 12)
    lp.cfg.train_hedm.epochs = 500  # long enough to be caught running
    service = lp.start_service("local")
    press(lp, "ml:Retrain")
    lp.wait_state({"Training"}, 120)
    (worker,) = service.executor._processes.values()
    os.kill(worker.pid, signal.SIGKILL)
    lp.wait_state({"Error"}, 30)
    message = lp.value("ml:Message")
    assert f"the worker (pid {worker.pid}) died: killed by signal 9 (SIGKILL)" in message
    assert message.startswith("training failed")
    wait_idle(service)
    assert lp.value("edge:ModelVersion") == 0

    lp.cfg.train_hedm.epochs = 3
    assert lp.retrain() == "Idle", lp.value("ml:Message")  # a fresh pool
    version = lp.value("edge:ModelVersion")
    assert version >= 1

    # killed while idle: once the pool knows (its threads may take a moment to go), the
    # next trigger starts a fresh pool instead of failing
    (worker,) = service.executor._processes.values()
    os.kill(worker.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not service.executor.broken:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert lp.retrain() == "Idle", lp.value("ml:Message")
    assert lp.value("edge:ModelVersion") > version


def parsl_worker(service):
    """The Parsl worker process running the task: of the worker pool's spawned children
    (its workers and a multiprocessing manager), the one that has used the most CPU."""
    (block,) = service.executor.dfk.executors["edgeloop"].provider.resources.values()
    pool = psutil.Process(block["remote_pid"]).children(recursive=True)
    spawned = [p for p in pool if "spawn_main" in " ".join(p.cmdline())]
    return max(spawned, key=cpu_s), pool


def cpu_s(proc) -> float:
    return sum(proc.cpu_times()[:2])


def training_worker(service):
    """The Parsl worker once it is busy training (call it in state Training: the labels
    are done, training is the one task left): the worker whose CPU time grows by a second
    from the call on. Not the one with the most CPU: the worker that made the labels has
    the most while it waits for the training task (a run killed it there, idle, under load,
    and the training ran on its restarted successor)."""
    _, pool = parsl_worker(service)
    before = {p.pid: cpu_s(p) for p in pool}

    def busy():
        _, now = parsl_worker(service)
        grown = [p for p in now if p.pid in before and cpu_s(p) > before[p.pid] + 1.0]
        return grown[0] if grown else None

    return wait_until(busy, 120, "a Parsl worker busy training", 0.2)


def test_parsl_worker_killed_and_abort_then_the_next_trigger_works(loop):  # noqa: F811
    lp = loop()
    hedm_scan(lp.cfg.data_path, 12)
    lp.cfg.train_hedm.epochs = 500
    service = lp.start_service("parsl")

    press(lp, "ml:Retrain")
    lp.wait_state({"Training"}, 300)
    worker = training_worker(service)
    worker.send_signal(signal.SIGKILL)
    lp.wait_state({"Error"}, 60)
    message = lp.value("ml:Message")
    assert message.startswith("training failed: its Parsl worker died"), message
    wait_idle(service)

    # the pool restarted its worker: the next run is taken, then aborted while training
    press(lp, "ml:Retrain")
    lp.wait_state({"Training"}, 300)
    _, pool = parsl_worker(service)
    press(lp, "ml:Abort")
    lp.wait_state({"Error"}, 60)
    assert lp.value("ml:Message") == "training aborted by ml:Abort"
    for proc in pool:  # the block that ran it is stopped, no worker left busy
        assert wait_process_gone(proc.pid), proc
    wait_idle(service)
    assert lp.value("edge:ModelVersion") == 0

    lp.cfg.train_hedm.epochs = 3
    assert lp.retrain(timeout=300) == "Idle", lp.value("ml:Message")  # on a fresh block
    assert lp.value("edge:ModelVersion") >= 1


def slow(fn, seconds=3.0):
    def slowed(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return slowed


@pytest.mark.parametrize("state", ["Staging", "Validating", "Deploying"])
def test_abort_in_each_step_deploys_nothing_and_the_next_trigger_works(
    loop,  # noqa: F811
    monkeypatch,
    state,
):
    import edgeloop.remote.staging as staging_module

    lp = loop()
    hedm_scan(lp.cfg.data_path, 12)
    lp.cfg.train_hedm.epochs = 3
    service = lp.start_service("local")
    registry = Registry(lp.cfg.registry_path)
    serving = 0
    if state == "Deploying":  # a model to go back to
        lp.cfg.remote.quality_margin = 10.0  # any next model passes the gate
        assert lp.retrain() == "Idle", lp.value("ml:Message")
        serving = lp.value("edge:ModelVersion")
    versions = registry.versions()

    with monkeypatch.context() as patch:
        if state == "Staging":
            scans = staging_module.SharedStaging.scans
            patch.setattr(staging_module.SharedStaging, "scans", slow(scans))
        elif state == "Validating":
            patch.setattr(service.pipeline.gate, "validate", slow(service.pipeline.gate.validate))
        else:  # the edge takes its time to load a model
            patch.setattr(lp.edge, "load_version", slow(lp.edge.load_version))
        press(lp, "ml:Retrain")
        lp.wait_state({state}, 120)
        press(lp, "ml:Abort")
        lp.wait_state({"Error"}, 30)
        message = lp.value("ml:Message")
        assert message.startswith(f"{state.lower()} aborted by ml:Abort"), message
        wait_idle(service)

    assert lp.value("edge:ModelVersion") == serving
    assert lp.value("ml:ModelVersion") == serving
    if state == "Deploying":  # it was loaded when the abort came: withdrawn
        (new,) = set(registry.versions()) - set(versions)
        assert f"v{new} withdrawn, v{serving} serving again" in message
        assert registry.meta(new)["status"] == "rejected"
        assert registry.accepted("braggnn") == serving
    else:
        assert registry.versions() == versions  # nothing added

    assert lp.retrain() == "Idle", lp.value("ml:Message")
    assert lp.value("edge:ModelVersion") > serving


def test_a_run_that_raises_anywhere_ends_in_error_saying_why(loop, monkeypatch):  # noqa: F811
    from edgeloop.remote.scan_index import ScanIndex

    lp = loop()
    lp.start_service("local")

    def unreadable(self, data_dir):
        raise OSError(f"{data_dir}: input/output error")

    monkeypatch.setattr(ScanIndex, "usable", unreadable)
    assert lp.retrain(timeout=30) == "Error"
    assert lp.value("ml:Message") == (
        f"retraining failed: OSError: {lp.cfg.data_path}: input/output error"
    )
    assert lp.value("ml:Progress") == 0.0  # where it stopped (Staging); the message says why


def test_a_button_set_while_the_service_was_down_is_ignored_and_said(loop):  # noqa: F811
    """Issue 22 item 10: ml:Retrain written with no service watching it does not start a
    retraining hours later when the service comes back; it is reset and said."""
    lp = loop()
    press(lp, "ml:Retrain")
    assert lp.value("ml:Retrain")["index"] == 1  # latched in the IOC
    lp.start_service("local")
    wait_until(lambda: lp.value("ml:Retrain")["index"] == 0, 30, "ml:Retrain reset", 0.1)
    wait_until(
        lambda: "was set while the service was not watching" in lp.value("ml:Message"),
        30,
        "the message",
        0.1,
    )
    assert lp.service.runs_finished == 0 and not lp.service._busy.locked()
    wait_until(lambda: lp.value("ml:DiskFree") > 0, 30, "ml:DiskFree posted", 0.1)
    assert lp.retrain(timeout=30) == "Error"  # a press now is acted on (no scans: Error)


def test_operator_policy_settings_outlive_restarts_of_the_ioc_and_the_service(loop):  # noqa: F811
    """Issue 22 item 13: ml:Auto* as the operator set them, not the IOC's start values."""
    from edgeloop.ioc import softioc
    from edgeloop.remote.policy_watcher import SETTINGS_FILE

    lp = loop()
    service = lp.start_service("local")
    lp.ctx.put(f"{lp.p}ml:AutoThreshold", 0.5, timeout=5)
    lp.ctx.put(f"{lp.p}ml:AutoRetrain", {"value.index": 1}, timeout=5)
    wait_until(lambda: service.policy.settings.threshold == 0.5, 30, "the setting", 0.1)
    settings = lp.cfg.registry_path / SETTINGS_FILE
    wait_until(lambda: settings.exists() and "0.5" in settings.read_text(), 30, "saved", 0.1)

    def restart_ioc():
        old = lp.ioc
        os.kill(old.pid, signal.SIGKILL)
        old.wait(10)
        old.stdin.close()
        lp.ioc = softioc.start(lp.p)

    restart_ioc()  # it starts with the configuration's 0.08 and Off
    wait_value(lp, "ml:AutoThreshold", 0.5)
    assert lp.value("ml:AutoRetrain")["index"] == 1 and service.policy.settings.enabled
    service.stop()  # both go: the IOC starts with its defaults, a new service restores
    restart_ioc()
    assert lp.value("ml:AutoThreshold") == lp.cfg.policy.threshold
    service = lp.start_service("local")
    wait_value(lp, "ml:AutoThreshold", 0.5)
    assert service.policy.settings.threshold == 0.5 and service.policy.settings.enabled
