"""Retraining's executors without servers: the Globus Compute payload through the SDK's own
serializer, the install hint for a missing SDK, Globus Transfer requests and their time
limit, and the example Parsl cluster configurations."""

from pathlib import Path

import pytest

from edgeloop.config import Config
from edgeloop.registry import sha256_bytes
from edgeloop.remote import tasks

pytestmark = pytest.mark.timeout(600)


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
    paths = ["/data/scan_1_ab.h5", "/data/b/scan_1_ab.h5"]
    tdata = transfer_data(src, dst, paths, "/inbox", Path("/data"))
    assert tdata["source_endpoint"] == src and tdata["destination_endpoint"] == dst
    assert tdata["sync_level"] in ("checksum", 3) and tdata["verify_checksum"] is True
    assert [(i["source_path"], i["destination_path"]) for i in tdata["DATA"]] == [
        ("/data/scan_1_ab.h5", "/inbox/scan_1_ab.h5"),
        ("/data/b/scan_1_ab.h5", "/inbox/b/scan_1_ab.h5"),  # one name, two folders
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
    cfg.data_dir = "/data"
    assert stage(["/data/x/a.h5"], cfg, client=TransferAPI(True)) == ["/inbox/x/a.h5"]


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


def test_globus_compute_without_a_stored_login_fails_at_once_naming_the_login(
    tmp_path, monkeypatch
):
    """Issue 22 item 16: the SDK would prompt for a login (stdin a pipe under procServ:
    forever); the service says what to run instead, in seconds."""
    import time

    from edgeloop.config import RemoteConfig
    from edgeloop.remote.executors import make_executor

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.globus_compute/storage.db here
    monkeypatch.delenv("GLOBUS_COMPUTE_CLIENT_ID", raising=False)
    monkeypatch.delenv("GLOBUS_COMPUTE_CLIENT_SECRET", raising=False)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="run `globus-compute-endpoint login` once"):
        make_executor("globus-compute", RemoteConfig(globus_endpoint_id="abc"))
    assert time.monotonic() - t0 < 10
