"""Every trigger is run or said (issue 22 items 14 and 15): a trigger during an executor
switch runs once the switch is done; one that comes while a retraining ends is not lost; a
rollback pressed during a retraining stops it from deploying and runs after it. The service
runs in this process with its retraining replaced by a stand-in that records its trigger
(the pipeline itself is tests/unit/test_pipeline.py)."""

import threading

import pytest

from edgeloop.config import Config
from edgeloop.waiting import wait_until


@pytest.fixture
def service(tmp_path):
    from edgeloop.remote.service import RetrainService

    cfg = Config(data_dir=str(tmp_path / "data"), registry_dir=str(tmp_path / "models"))
    cfg.tiled.enabled = False  # the scans are files in data_dir
    cfg.security.signing_key_file = str(tmp_path / "signing.key")
    svc = RetrainService(cfg, executor=object())
    svc.said = []
    svc.pvs.message = svc.said.append
    svc.pvs.status = lambda state, message=None: svc.said.append(f"{state}: {message}")
    svc.ran, svc.release = [], threading.Event()
    svc.release.set()

    def run_once():
        svc.ran.append(svc.trigger)
        svc.release.wait(30)

    svc.run_once = run_once
    yield svc
    svc.release.set()
    svc._stop.set()
    svc.ctx.close()


def idle(svc) -> None:
    wait_until(lambda: not svc._worker_alive, 30, "the retraining thread to end", 0.01)


def test_a_trigger_during_an_executor_switch_runs_after_it(service):
    with service._busy:  # what _switch_executor holds while it switches
        assert service.request("operator (ml:Retrain)")
        assert service.ran == []
    idle(service)
    assert service.ran == ["operator (ml:Retrain)"]


def test_a_trigger_while_one_runs_is_queued_once_and_a_later_one_replaces_it(service):
    service.release.clear()
    service.request("first")
    wait_until(lambda: service.ran == ["first"], 30, "the first to run", 0.01)
    assert not service.request("second") and not service.request("third")
    assert "one follow-up queued (third)" in service.said[-1]
    service.release.set()
    idle(service)
    assert service.ran == ["first", "third"]
    service.request("later")
    idle(service)
    assert service.ran[-1] == "later"


def test_no_trigger_is_lost_while_runs_end(service):
    """Requests from many threads while short runs come and go: the last is always run."""
    for round_ in range(50):
        threads = [
            threading.Thread(target=service.request, args=(f"{round_}-{k}",)) for k in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        last = f"{round_}-last"
        service.request(last)
        idle(service)
        assert service.ran[-1] == last, service.ran[-6:]


def test_a_rollback_during_a_retraining_stops_it_deploying_and_runs_after_it(service):
    order = []
    service._roll_back = lambda: order.append(("rollback", service.pipeline.abort.is_set()))
    service.release.clear()
    service.request("a retraining")
    wait_until(lambda: service._retraining, 30, "the retraining to run", 0.01)
    service.rollback()
    assert service.pipeline.abort.is_set()  # the pipeline deploys nothing once this is set
    assert "stops without deploying" in service.said[-1] and order == []
    service.release.set()
    wait_until(lambda: order, 30, "the rollback", 0.01)
    assert order == [("rollback", True)] and service.ran == ["a retraining"]
