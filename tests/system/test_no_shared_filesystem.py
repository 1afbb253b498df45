"""Issue 22 item 16: a retraining whose executor shares no filesystem with the service.

The executor's worker runs where the service's data, registry and keys are not mounted (a
mount namespace of its own; the premise is checked first); Globus Transfer carries the scans
and the models out and the labels back (globus-sdk's TransferClient with the stored,
refreshed login, against the SDK's own Transfer fixtures: tests/kit/globus_transfer.py)."""

import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from edgeloop import approval
from edgeloop.config import Config
from edgeloop.registry import Registry
from edgeloop.remote.executor_slot import ExecutorSlot
from edgeloop.remote.pipeline import RetrainPipeline
from edgeloop.signing import create_key
from tests.kit.endpoint_machine import can_hide, elsewhere
from tests.kit.globus_transfer import REFRESHED, TransferService, copy_as, store_login
from tests.kit.loops import hedm_scan
from tests.kit.progress import Recorder

pytestmark = [pytest.mark.timeout(600)]

SRC, DST = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"


@pytest.fixture
def endpoint_home():
    """The endpoint's own folder, outside the service's tmp_path."""
    if not can_hide():
        pytest.skip("a mount namespace of its own for the endpoint needs CAP_SYS_ADMIN")
    home = Path(tempfile.mkdtemp(prefix="edgeloop-endpoint-"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_a_retraining_without_a_shared_filesystem_runs_end_to_end(tmp_path, endpoint_home):
    home, owner = endpoint_home, (os.getuid(), os.getgid())
    cfg = Config(mode="hedm", data_dir=str(tmp_path / "data"), registry_dir=str(tmp_path / "m"))
    cfg.tiled.enabled = False  # the scans are files in data_dir
    cfg.hedm.frame_size = 256
    cfg.train_hedm.epochs = 4
    cfg.remote.quality_margin = 10.0  # the second run is to start from v1, not to beat it
    key = tmp_path / "signing.key"
    create_key(key)
    cfg.security.signing_key_file = str(key)
    endpoint_key = home / "signing.key"  # the endpoint's own copy of the shared key
    copy_as(key, endpoint_key, owner)
    endpoint_key.chmod(0o600)
    cfg.security.executor_signing_key_file = str(endpoint_key)
    inbox = home / "inbox"
    r = cfg.remote
    r.staging, r.globus_source_collection, r.globus_dest_collection = "globus", SRC, DST
    r.globus_dest_dir = str(inbox)
    r.globus_client_id = "6f5b1c5e-0000-4000-8000-000000000001"
    r.globus_token_file = str(tmp_path / "tokens.db")
    r.globus_data_access = False
    store_login(tmp_path / "tokens.db")
    hedm_scan(cfg.data_path, 12)

    registry, deployed = Registry(cfg.registry_path), []

    def deploy(version):  # what the edge does once a version serves
        deployed.append(version)
        registry.mark_accepted(version)

    spawn = multiprocessing.get_context("spawn")

    def endpoint(name):
        return ProcessPoolExecutor(1, spawn, initializer=elsewhere, initargs=([str(tmp_path)],))

    slot = ExecutorSlot("endpoint", endpoint, None)
    try:
        # the premise: the endpoint sees none of the service's files
        for path in (key, cfg.data_path, cfg.registry_path):
            with pytest.raises(FileNotFoundError):
                slot.submit(os.stat, str(path)).result(120)
        pipeline = RetrainPipeline(cfg, registry, slot, Recorder(), deploy)
        with TransferService({DST: owner, SRC: owner}) as service:
            first = pipeline.run("no shared filesystem")
            second = pipeline.run("again, from v1")
    finally:
        slot.shutdown()

    assert (first["version"], second["version"]) == (1, 2) and deployed == [1, 2]
    meta = registry.meta(2)
    assert meta["parent"] == 1 and meta["baseline"] == 1
    assert meta["baseline_val_loss"] is not None  # v1 was evaluated here as the baseline
    assert all(Path(p).is_relative_to(inbox) for p in meta["trained_on"])
    # each transfer: scans out, labels back; the second run also its start (v1), once
    out = [task for task in service.tasks if Path(task[0][1]).is_relative_to(inbox)]
    back = [task for task in service.tasks if task not in out]
    assert len(out) == 3 and len(back) == 2, service.tasks
    (models,) = [task for task in out if Path(task[0][1]).parent == inbox / "models"]
    assert models == [
        (
            str(registry.root / registry.meta(1)["file"]),
            str(inbox / "models" / Path(registry.meta(1)["file"]).name),
        )
    ]
    for (labels_there, labels_here), version in zip((t[0] for t in back), (1, 2), strict=True):
        assert Path(labels_there).is_file()  # written by the endpoint in its folder
        assert Path(labels_here).is_relative_to(cfg.registry_path / "work")
        # the gate signed the labels it read here, with their checksum
        fields = approval.check(approval.public_key(cfg.security), registry.meta(version), version)
        assert fields["labels"] == labels_here
        assert fields["labels_sha256"] == registry.meta(version)["labels_sha256"]
    assert set(service.bearers) == {f"Bearer {REFRESHED}"}
