"""Retraining on the executors and its lifecycle: Parsl for real on loopback, the Globus
Compute payload through the SDK's own serializer, Globus Transfer requests, the quality
gate, abort, rollback, time limits, failing endpoints and tasks, timing PVs, and the Bluesky
trigger callback.

The service under test runs in this process against its own real ML IOC (pvxs QSRV2) and
edge server, on a prefix of its own; scans are written by the real RunEngine + ScanWriter
from ophyd.sim devices that render simulated HEDM frames."""

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import random_prefix, run_engine, wait_process_gone
from p4p.client.thread import Context

from edgeloop.config import Config
from edgeloop.registry import Registry, sha256_bytes
from edgeloop.remote import tasks
from edgeloop.signing import create_key

pytestmark = pytest.mark.timeout(600)


def hedm_scan(data_dir: Path, frames: int = 12, start: float = 0.0, blank: bool = False):
    """One HEDM rotation scan through the RunEngine and ScanWriter (ophyd.sim hardware)."""
    from ophyd import Component as Cpt
    from ophyd import Device
    from ophyd.sim import SynAxis, SynSignal

    from edgeloop.bluesky_plans import ScanWriter, hedm_rotation_scan
    from edgeloop.config import HedmConfig
    from edgeloop.ioc.hedm import HedmSimulator

    sim = HedmSimulator(HedmConfig(frame_size=256))
    rot = SynAxis(name="rot")

    def render():
        if blank:
            return np.full((256, 256), 20, np.uint16)
        return sim.frame(float(rot.position))[0]

    class Cam(Device):
        image = Cpt(SynSignal, func=render, kind="hinted")

        def trigger(self):
            return self.image.trigger()

    writer = ScanWriter(data_dir)
    with run_engine() as RE:
        RE.subscribe(writer)
        RE(hedm_rotation_scan(Cam(name="cam"), rot, start, start + 3.0, frames))
    return writer.last_path


class Loop:
    """ML IOC + edge server + retraining service (in process) on a prefix of their own."""

    def __init__(self, tmp: Path, **remote):
        from edgeloop.edge_pva.server import EdgeServer
        from edgeloop.ioc import softioc

        self.cfg = Config(
            prefix=random_prefix("r"),
            mode="hedm",
            data_dir=str(tmp / "data"),
            registry_dir=str(tmp / "models"),
        )
        self.cfg.security.signing_key_file = str(tmp / "signing.key")  # never ~/.edgeloop
        create_key(tmp / "signing.key")
        self.cfg.hedm.frame_size = 256
        self.cfg.train_hedm.epochs = 4
        for key, value in remote.items():
            setattr(self.cfg.remote, key, value)
        self.p = self.cfg.prefix
        self.ioc = softioc.start(self.p)
        self.edge = EdgeServer(self.cfg, input_pv=f"{self.p}none:Image").start()
        self.ctx = Context("pva", nt=False)
        self.service = None

    def start_service(self, executor: str = "local"):
        from edgeloop.remote.service import RetrainService

        self.cfg.executor = executor
        self.service = RetrainService(self.cfg).start()
        return self.service

    def value(self, name):
        return self.ctx.get(f"{self.p}{name}", timeout=5)["value"]

    def state(self):
        v = self.ctx.get(f"{self.p}ml:Status", timeout=5)["value"]
        return v["choices"][v["index"]]

    def wait_state(self, states, timeout):
        deadline = time.monotonic() + timeout
        while (s := self.state()) not in states:
            assert time.monotonic() < deadline, (s, self.value("ml:Message"))
            time.sleep(0.1)
        return s

    def retrain(self, timeout=300):
        """Trigger through the PV, as an operator, and wait for the outcome."""
        done = self.service.runs_finished
        self.ctx.put(f"{self.p}ml:Retrain", {"value.index": 1}, timeout=5)
        deadline = time.monotonic() + timeout
        while self.service.runs_finished == done:
            assert time.monotonic() < deadline, self.value("ml:Message")
            time.sleep(0.1)
        return self.state()

    def close(self):
        if self.service is not None:
            self.service.stop()
        self.ctx.close()
        self.edge.stop()
        self.ioc.stdin.close()
        self.ioc.wait(10)


@pytest.fixture
def loop(tmp_path):
    loops = []

    def make(**remote):
        lp = Loop(tmp_path / f"loop{len(loops)}", **remote)
        loops.append(lp)
        return lp

    yield make
    for lp in loops:
        lp.close()


# --------------------------------------------------------------------------- Parsl


@pytest.mark.system
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


@pytest.mark.system
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


# --------------------------------------------------------------------------- Globus


def test_globus_compute_payloads_round_trip_the_sdk_serializer(tmp_path):
    """What the Globus Compute executor would send and get back: the task function, its
    request, and its result (a real trained model) through the SDK's ComputeSerializer,
    each within the service's payload limit."""
    from globus_compute_sdk.serialize import ComputeSerializer

    from edgeloop.models import BraggNN, PtychoNN
    from edgeloop.registry import model_to_bytes
    from edgeloop.remote.executors import GLOBUS_COMPUTE_PAYLOAD_LIMIT

    ser = ComputeSerializer()
    request = {
        "labels": str(tmp_path / "labels.h5"),
        "labels_sha256": "0" * 64,
        "init": None,
        "init_sha256": None,
        "baseline": None,
        "baseline_sha256": None,
        "kind": "braggnn",
        "arch": {"patch": 11, "width": 64},
        "train": vars(Config().train_hedm),
    }
    fn = ser.deserialize(ser.serialize(tasks.train_model))
    assert fn.__name__ == "train_model" and fn.__module__ == tasks.train_model.__module__
    args = ser.serialize(((request,), {}))
    assert ser.deserialize(args) == ((request,), {})
    assert len(args) < GLOBUS_COMPUTE_PAYLOAD_LIMIT
    for model, arch in ((BraggNN(11), {"patch": 11}), (PtychoNN(32), {"width": 32})):
        blob = model_to_bytes("x", arch, model)
        result = {"model": blob, "sha256": sha256_bytes(blob), "val_loss": 0.1}
        packed = ser.serialize(result)
        back = ser.deserialize(packed)
        assert sha256_bytes(back["model"]) == result["sha256"]
        assert len(packed) < GLOBUS_COMPUTE_PAYLOAD_LIMIT, len(packed)  # published size


@pytest.mark.system
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
    assert lp.service.endpoint == "local"
    hedm_scan(lp.cfg.data_path, 12)
    assert lp.retrain() == "Idle", lp.value("ml:Message")  # the next trigger works


@pytest.mark.system
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
    assert lp.service.endpoint == "local"


@pytest.mark.system
def test_retrain_without_scans_ends_in_error_with_a_message(loop):
    lp = loop()
    lp.start_service("local")
    assert not list(lp.cfg.data_path.glob("scan_*.h5"))
    assert lp.retrain(timeout=30) == "Error"
    assert "no scans" in lp.value("ml:Message")
    assert lp.ctx.get(f"{lp.p}ml:Status", timeout=5)["alarm.severity"] == 2  # MAJOR
    assert lp.value("ml:Retrain")["index"] == 0  # the trigger was taken


def test_missing_optional_sdk_names_the_extra_to_install(monkeypatch):
    import sys

    from edgeloop.config import RemoteConfig
    from edgeloop.remote.executors import make_executor

    monkeypatch.setitem(sys.modules, "parsl", None)  # as if `pip install` had left it out
    with pytest.raises(ImportError, match=r"pip install 'edgeloop\[parsl\]'"):
        make_executor("parsl", RemoteConfig())
    monkeypatch.setitem(sys.modules, "globus_compute_sdk", None)
    with pytest.raises(ImportError, match=r"pip install 'edgeloop\[globus\]'"):
        make_executor("globus-compute", RemoteConfig(globus_endpoint_id="abc"))


def test_globus_transfer_request_wait_and_timeout():
    from edgeloop.remote.staging import StagingError, globus_transfer, stage, transfer_data

    src, dst = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"
    tdata = transfer_data(src, dst, ["/data/scan_1_ab.h5", "/data/scan_2_cd.h5"], "/inbox")
    assert tdata["source_endpoint"] == src and tdata["destination_endpoint"] == dst
    assert tdata["sync_level"] in ("checksum", 3) and tdata["verify_checksum"] is True
    assert [(i["source_path"], i["destination_path"]) for i in tdata["DATA"]] == [
        ("/data/scan_1_ab.h5", "/inbox/scan_1_ab.h5"),
        ("/data/scan_2_cd.h5", "/inbox/scan_2_cd.h5"),
    ]

    class TransferAPI:  # the network boundary: records calls, answers like the service
        def __init__(self, finishes, status="SUCCEEDED"):
            self.finishes, self.status, self.calls = finishes, status, []

        def submit_transfer(self, data):
            self.calls.append(("submit", len(data["DATA"])))
            return {"task_id": "task-1"}

        def task_wait(self, task_id, timeout, polling_interval):
            self.calls.append(("wait", timeout))
            return self.finishes

        def cancel_task(self, task_id):
            self.calls.append(("cancel", task_id))

        def get_task(self, task_id):
            return {"status": self.status}

    ok = TransferAPI(True)
    assert globus_transfer(ok, tdata, 30) == "task-1"
    slow = TransferAPI(False)
    with pytest.raises(StagingError, match="did not finish"):
        globus_transfer(slow, tdata, 30)
    assert ("cancel", "task-1") in slow.calls
    with pytest.raises(StagingError, match="FAILED"):
        globus_transfer(TransferAPI(True, "FAILED"), tdata, 30)
    cfg = Config()
    cfg.remote.staging = "globus"
    with pytest.raises(StagingError, match="globus_source_collection"):
        stage(["/data/a.h5"], cfg)
    cfg.remote.globus_source_collection, cfg.remote.globus_dest_collection = src, dst
    cfg.remote.globus_dest_dir = "/inbox"
    assert stage(["/data/a.h5"], cfg, client=TransferAPI(True)) == ["/inbox/a.h5"]


# --------------------------------------------------------------------------- lifecycle


@pytest.mark.system
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


@pytest.mark.system
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


@pytest.mark.system
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


# --------------------------------------------------------------------------- triggers


@pytest.mark.system
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
    for _ in range(3):
        pv_trigger.fire()
        time.sleep(0.2)
    deadline = time.monotonic() + 300
    while not (len(runs) == 2 and not service._busy.locked()):
        assert time.monotonic() < deadline, runs
        time.sleep(0.2)
    time.sleep(1.0)
    assert len(runs) == 2 and lp.state() == "Idle"
    # recorded with its source: the PV, the message and the model's metadata
    trigger = lp.value("ml:Trigger")
    assert trigger.startswith("bluesky RetrainTrigger after run") and "(ml:Request)" in trigger
    assert f"triggered by {trigger}" in lp.value("ml:Message")
    newest = max(service.registry.versions())
    assert service.registry.meta(newest)["trigger"] == trigger


@pytest.mark.parametrize("example", ["slurm.py", "pbs.py"])
def test_cluster_parsl_examples_build_a_config(example):
    """The documented Slurm / PBS configurations load and name their scheduler; they are not
    submitted (no cluster here)."""
    from parsl.providers import PBSProProvider, SlurmProvider

    from edgeloop.config import RemoteConfig
    from edgeloop.remote.executors import parsl_config

    path = Path(tasks.__file__).parent / "parsl_examples" / example
    cfg = parsl_config(RemoteConfig(parsl_config_file=str(path)))
    (htex,) = cfg.executors
    assert htex.label == "edgeloop"
    assert isinstance(htex.provider, SlurmProvider if example == "slurm.py" else PBSProProvider)
    assert "activate" in htex.provider.worker_init
