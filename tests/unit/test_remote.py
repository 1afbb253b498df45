"""Retraining's executors without servers: the Globus Compute payload through the SDK's own
serializer, the install hint for a missing SDK, Globus Transfer requests and their time
limit, and the example Parsl cluster configurations."""

import json
import os
import uuid
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


SRC, DST = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"


def globus_config(tmp_path) -> Config:
    cfg = Config(data_dir=str(tmp_path / "data"), registry_dir=str(tmp_path / "m"))
    cfg.remote.staging = "globus"
    cfg.remote.globus_source_collection, cfg.remote.globus_dest_collection = SRC, DST
    cfg.remote.globus_dest_dir = str(tmp_path / "inbox")
    cfg.remote.globus_client_id = "6f5b1c5e-0000-4000-8000-000000000001"
    cfg.remote.globus_token_file = str(tmp_path / "tokens.db")
    cfg.remote.globus_data_access = False
    return cfg


def test_globus_transfer_request_wait_and_timeout(tmp_path):
    """Globus staging through globus-sdk's TransferClient with the stored login, against
    the SDK's own Transfer fixtures: the expired access token is refreshed from storage,
    one name in two folders stays two, a task still running at its limit is cancelled,
    one that fails ends the retraining with its status."""
    from edgeloop.remote.staging import (
        GlobusStaging,
        StagingError,
        globus_transfer,
        staging,
        transfer_data,
    )
    from tests.kit.globus_transfer import REFRESHED, TransferService, store_login

    items = [("/data/scan_1_ab.h5", "/inbox/scan_1_ab.h5")]
    tdata = transfer_data(SRC, DST, items, "edgeloop scans")
    assert tdata["source_endpoint"] == SRC and tdata["destination_endpoint"] == DST
    assert tdata["sync_level"] in ("checksum", 3) and tdata["verify_checksum"] is True

    cfg = globus_config(tmp_path)
    for folder in ("a", "b"):
        scan = cfg.data_path / folder / "scan_1_ab.h5"
        scan.parent.mkdir(parents=True)
        scan.write_bytes(folder.encode() * 10)
    with pytest.raises(StagingError, match="run `edgeloop globus login` once"):
        staging(cfg).scans([str(cfg.data_path / "a" / "scan_1_ab.h5")])
    store_login(tmp_path / "tokens.db")
    me = (os.getuid(), os.getgid())
    with TransferService({DST: me, SRC: me}) as service:
        sent = staging(cfg).scans([str(cfg.data_path / f / "scan_1_ab.h5") for f in "ab"])
        inbox = Path(cfg.remote.globus_dest_dir)
        assert sent == [str(inbox / "a/scan_1_ab.h5"), str(inbox / "b/scan_1_ab.h5")]
        assert [Path(p).read_bytes() for p in sent] == [b"a" * 10, b"b" * 10]
        # the Transfer calls carried the token the SDK refreshed from the stored login
        assert service.bearers and set(service.bearers) == {f"Bearer {REFRESHED}"}
    with TransferService({DST: me}, status="ACTIVE") as slow:
        with pytest.raises(StagingError, match="did not finish in 1 s"):
            globus_transfer(GlobusStaging(cfg).client, tdata, 1, poll_s=1)
        assert slow.cancelled == 1
    with TransferService({DST: me}, status="FAILED"):
        with pytest.raises(StagingError, match="ended FAILED"):
            GlobusStaging(cfg).scans([str(cfg.data_path / "a" / "scan_1_ab.h5")])
    cfg.remote.globus_dest_dir = ""
    with pytest.raises(StagingError, match="globus_dest_dir"):
        staging(cfg)


def test_globus_login_stores_refreshable_tokens_that_the_service_then_uses(
    tmp_path, monkeypatch, capsys
):
    """`edgeloop globus login` through globus-sdk's login flow (the URL printed, the code
    read, the id_token checked against Globus Auth's published key), tokens stored 0600
    where the service finds them; `edgeloop globus status` then passes without a prompt."""
    from edgeloop.app import cli
    from tests.kit.globus_transfer import AuthService

    cfg = globus_config(tmp_path)
    config_file = tmp_path / "edgeloop.json"
    keys = ("globus_client_id", "globus_token_file", "globus_data_access")
    config_file.write_text(json.dumps({"remote": {k: getattr(cfg.remote, k) for k in keys}}))
    with pytest.raises(SystemExit, match="run `edgeloop globus login` once"):
        cli.main(["globus", "status", "--config", str(config_file)])
    monkeypatch.setattr("builtins.input", lambda prompt="": AuthService.CODE)
    with AuthService(cfg.remote.globus_client_id, str(uuid.uuid4())) as auth:
        cli.main(["globus", "login", "--config", str(config_file)])
    printed = capsys.readouterr().out
    assert f"client_id={cfg.remote.globus_client_id}" in printed
    assert f"Globus tokens stored in {tmp_path / 'tokens.db'}" in printed
    assert auth.codes == [AuthService.CODE]
    assert (tmp_path / "tokens.db").stat().st_mode & 0o077 == 0
    cli.main(["globus", "status", "--config", str(config_file)])
    assert "Globus Transfer: logged in" in capsys.readouterr().out


def test_globus_data_access_consents_are_asked_for_both_collections(tmp_path):
    from edgeloop.remote.globus_login import transfer_app

    cfg = globus_config(tmp_path)
    cfg.remote.globus_data_access = True
    app, _ = transfer_app(cfg)
    asked = {
        str(dep).strip("*")
        for scope in app.scope_requirements["transfer.api.globus.org"]
        for dep in scope.dependencies
    }
    assert asked == {f"https://auth.globus.org/scopes/{c}/data_access" for c in (SRC, DST)}


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
