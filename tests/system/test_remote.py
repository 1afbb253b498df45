"""Retraining on the executors and its lifecycle: Parsl for real on loopback, the Globus
Compute payload through the SDK's own serializer, Globus Transfer requests, the quality
gate, abort, rollback, time limits, failing endpoints and tasks, timing PVs, and the Bluesky
trigger callback.

The service under test runs in this process against its own real ML IOC (pvxs QSRV2) and
edge server, on a prefix of its own; scans are written by the real RunEngine + ScanWriter
from ophyd.sim devices that render simulated HEDM frames."""

import time

import pytest

from edgeloop.registry import Registry, sha256_bytes
from edgeloop.remote import tasks
from edgeloop.waiting import holds_for, wait_until
from tests.kit.loops import hedm_scan
from tests.kit.waiting import wait_process_gone

pytestmark = pytest.mark.timeout(600)


def test_parsl_closes_the_loop_with_timings_and_model_metadata(loop):
    lp = loop()
    hedm_scan(lp.cfg.data_path, 12)
    lp.start_service("parsl")
    assert lp.value("ml:Endpoint") == "parsl"
    assert lp.retrain(timeout=400) == "Idle", lp.value("ml:Message")
    version = lp.value("ml:ModelVersion")
    assert version >= 1 and lp.value("edge:ModelVersion") == version
    timings = {
        pv: lp.value(pv)
        for pv in (
            "ml:StagingTime",
            "ml:AnalysisTime",
            "ml:TrainingTime",
            "ml:ReturnTime",
            "ml:EndToEndTime",
        )
    }
    assert all(t > 0 for k, t in timings.items() if k != "ml:StagingTime"), timings
    assert timings["ml:EndToEndTime"] >= timings["ml:TrainingTime"] + timings["ml:AnalysisTime"]
    meta = Registry(lp.cfg.registry_path).meta(version)
    assert meta["executor"] == "parsl" and meta["kind"] == "braggnn"
    assert meta["trained_on"] and meta["labels_sha256"] and meta["code_version"]
    assert meta["status"] == "accepted" and meta["created"] > 0
    assert set(meta["timings"]) >= {"staging_s", "analysis_s", "training_s"}


def test_parsl_executor_returns_results_and_task_errors(tmp_path):
    from edgeloop.remote.executors import make_executor

    ex = make_executor("parsl", run_dir=str(tmp_path / "runinfo"))
    try:
        assert ex.submit(sha256_bytes, b"abc").result(timeout=120) == sha256_bytes(b"abc")
        with pytest.raises(ValueError, match="no analysis for model kind"):
            ex.submit(
                tasks.analyze, {"kind": "nonsense", "scans": [], "out": str(tmp_path / "x.h5")}
            ).result(timeout=120)
    finally:
        ex.shutdown()


def test_globus_compute_endpoint_wiring_up_to_the_network(loop, monkeypatch):
    """The real SDK is driven until it needs the service: with client credentials (dummy
    here) building the executor logs in over the network, which is unreachable from here —
    the service refuses the endpoint with the SDK's error and keeps its executor."""
    from edgeloop.remote.executors import make_executor

    with pytest.raises(ValueError, match="globus_endpoint_id"):
        make_executor("globus-compute")
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_ID", "00000000-0000-0000-0000-000000000001")
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_SECRET", "not-a-secret")
    lp = loop(globus_endpoint_id="11111111-2222-3333-4444-555555555555")
    lp.start_service("local")
    lp.ctx.put(f"{lp.p}ml:Endpoint", "globus-compute", timeout=5)
    lp.wait_state({"Error"}, 120)
    message = lp.value("ml:Message")
    assert "refused" in message and "still using local" in message, message
    assert lp.service.executor_name == "local"
    hedm_scan(lp.cfg.data_path, 12)
    assert lp.retrain() == "Idle", lp.value("ml:Message")  # the next trigger works


def test_unknown_or_unconfigured_endpoint_is_refused(loop):
    lp = loop()
    lp.start_service("local")
    lp.ctx.put(f"{lp.p}ml:Endpoint", "globus-compute", timeout=5)
    lp.wait_state({"Error"}, 30)
    assert "globus_endpoint_id" in lp.value("ml:Message")
    deadline = time.monotonic() + 10
    while lp.value("ml:Endpoint") != "local":  # the PV goes back to what is in use
        assert time.monotonic() < deadline
        time.sleep(0.1)
    lp.ctx.put(f"{lp.p}ml:Endpoint", "nonsense", timeout=5)
    deadline = time.monotonic() + 10
    while "nonsense" not in lp.value("ml:Message"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert lp.service.executor_name == "local"


def test_retrain_without_scans_ends_in_error_with_a_message(loop):
    lp = loop()
    lp.start_service("local")
    assert not list(lp.cfg.data_path.glob("scan_*.h5"))
    assert lp.retrain(timeout=30) == "Error"
    assert "no scans" in lp.value("ml:Message")
    assert lp.ctx.get(f"{lp.p}ml:Status", timeout=5)["alarm.severity"] == 2  # MAJOR
    assert lp.value("ml:Retrain")["index"] == 0  # the trigger was taken


def test_quality_gate_rollback_and_restart(loop, tmp_path):
    lp = loop(quality_margin=0.05)
    hedm_scan(lp.cfg.data_path, 12)
    lp.start_service("local")
    reg = Registry(lp.cfg.registry_path)
    assert lp.retrain() == "Idle", lp.value("ml:Message")
    v1 = lp.value("edge:ModelVersion")
    assert lp.retrain() == "Idle", lp.value("ml:Message")  # from v1, not worse than v1
    v2 = lp.value("edge:ModelVersion")
    assert v2 > v1 and reg.meta(v2)["baseline"] == v1
    assert reg.meta(v2)["val_loss"] <= reg.meta(v2)["baseline_val_loss"] * 1.05

    lp.cfg.remote.quality_margin = -0.999  # demand a 1000x better model: the gate says no
    assert lp.retrain() == "Error"
    assert "quality gate" in lp.value("ml:Message")
    rejected = max(reg.versions())
    assert reg.meta(rejected)["status"] == "rejected"
    assert lp.value("edge:ModelVersion") == v2  # serving model untouched

    lp.ctx.put(f"{lp.p}ml:Rollback", {"value.index": 1}, timeout=5)
    deadline = time.monotonic() + 30
    while lp.value("edge:ModelVersion") != v1:
        assert time.monotonic() < deadline, lp.value("ml:Message")
        time.sleep(0.1)
    assert "rolled back" in lp.value("ml:Message") and reg.accepted("braggnn") == v1

    from edgeloop.edge_pva.server import EdgeServer

    restarted = EdgeServer(lp.cfg, input_pv=f"{lp.p}none:Image")  # not started: no PVs
    assert restarted.slots["braggnn"].get().version == v1


def test_abort_a_running_training_then_the_next_trigger_works(loop):
    lp = loop()
    hedm_scan(lp.cfg.data_path, 12)
    lp.cfg.train_hedm.epochs = 500  # long enough to be caught running
    lp.start_service("local")
    lp.ctx.put(f"{lp.p}ml:Retrain", {"value.index": 1}, timeout=5)
    lp.wait_state({"Training"}, 120)
    (worker,) = lp.service.executor._processes.values()
    lp.ctx.put(f"{lp.p}ml:Abort", {"value.index": 1}, timeout=5)
    lp.wait_state({"Error"}, 30)
    assert "aborted" in lp.value("ml:Message")
    assert wait_process_gone(worker.pid, 10)  # the training process is gone
    assert lp.value("edge:ModelVersion") == 0
    lp.cfg.train_hedm.epochs = 3
    assert lp.retrain() == "Idle", lp.value("ml:Message")
    assert lp.value("edge:ModelVersion") >= 1


def test_time_limit_failing_task_and_corrupted_result_end_in_error(loop):
    lp = loop()
    hedm_scan(lp.cfg.data_path, 12, blank=True)  # no peaks: the analysis raises
    lp.start_service("local")
    assert lp.retrain() == "Error"
    assert "only 0 peaks" in lp.value("ml:Message")
    assert lp.ctx.get(f"{lp.p}ml:Status")["alarm.severity"] == 2

    hedm_scan(lp.cfg.data_path, 12, start=10.0)
    lp.cfg.train_hedm.epochs = 500
    lp.cfg.remote.task_timeout_s = 2.0
    assert lp.retrain() == "Error"
    assert "time limit" in lp.value("ml:Message")
    assert lp.value("edge:ModelVersion") == 0

    class Corrupting:  # the network boundary garbles the returned model
        def __init__(self, inner):
            self.inner = inner

        def submit(self, fn, *args):
            future = self.inner.submit(fn, *args)
            if fn is not tasks.train_model:
                return future
            from concurrent.futures import Future

            out = Future()
            future.add_done_callback(
                lambda f: out.set_result(
                    dict(f.result(), model=f.result()["model"][:-10] + b"0" * 10)
                )
            )
            return out

        def shutdown(self, wait=True, cancel_futures=False):
            self.inner.shutdown(wait=wait, cancel_futures=cancel_futures)

    lp.cfg.remote.task_timeout_s = 300
    lp.cfg.train_hedm.epochs = 3
    lp.service.executor = Corrupting(lp.service.executor)
    assert lp.retrain() == "Error"
    assert "checksum" in lp.value("ml:Message")
    assert lp.value("edge:ModelVersion") == 0
    lp.service.executor = lp.service.executor.inner
    assert lp.retrain() == "Idle", lp.value("ml:Message")  # and the next trigger works


def test_bluesky_trigger_every_n_runs_and_frames_and_coalescing(loop, RE):
    from bluesky.plans import count
    from ophyd.sim import det

    from edgeloop.bluesky_plans import RetrainTrigger

    calls = []
    trigger = RetrainTrigger(every_n_runs=2, request=lambda reason: calls.append("run"))
    RE.subscribe(trigger)
    RE.md["technique"] = "hedm"
    for _ in range(5):
        RE(count([det], num=3))
    assert calls == ["run", "run"]
    by_frames = RetrainTrigger(every_n_frames=7, request=lambda reason: calls.append("frames"))
    RE.subscribe(by_frames)
    for _ in range(3):
        RE(count([det], num=3))  # 3, 6, 9 frames: due after the third run
    assert calls.count("frames") == 1
    RE.md["technique"] = "other"
    RE(count([det], num=10))  # not a technique edgeloop trains on
    assert by_frames.frames == 0 and calls.count("frames") == 1

    # through the PV, to a busy service: three requests coalesce into one follow-up
    lp = loop()
    hedm_scan(lp.cfg.data_path, 12)
    lp.cfg.train_hedm.epochs = 20
    service = lp.start_service("local")
    runs = []
    original = service.run_once
    service.run_once = lambda: runs.append(time.monotonic()) or original()
    pv_trigger = RetrainTrigger(lp.p)
    pv_trigger.fire()
    lp.wait_state({"Analyzing", "Training"}, 30)
    for _ in range(3):  # however many of these the service's monitor sees, one follow-up
        pv_trigger.fire()
    wait_until(lambda: len(runs) == 2 and not service._busy.locked(), 300, "two runs", 0.2)
    holds_for(lambda: len(runs) == 2, 1.0, "no third run", detail=lambda: repr(runs))
    assert lp.state() == "Idle"
    # recorded with its source: the PV, the message and the model's metadata
    trigger = lp.value("ml:Trigger")
    assert trigger.startswith("bluesky RetrainTrigger after run") and "(ml:Request)" in trigger
    assert f"triggered by {trigger}" in lp.value("ml:Message")
    newest = max(service.registry.versions())
    assert service.registry.meta(newest)["trigger"] == trigger
