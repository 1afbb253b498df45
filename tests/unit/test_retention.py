"""Disk over a beamtime (issue 22 item 17): what [retention] keeps of the model versions,
the labels files, the labels cache and the Parsl runs; a pruned version is never served;
ml:DiskFree's figure."""

import os
import shutil

import pytest

from edgeloop.config import Config
from edgeloop.edge_pva.inference import ModelRejected
from edgeloop.edge_pva.model_loader import ModelLoader
from edgeloop.models import BraggNN, PtychoNN
from edgeloop.registry import Registry, model_to_bytes
from edgeloop.remote import retention
from tests.kit.models import add_approved


@pytest.fixture
def cfg(tmp_path):
    cfg = Config(data_dir=str(tmp_path / "data"), registry_dir=str(tmp_path / "models"))
    cfg.security.signing_key_file = str(tmp_path / "keys" / "signing.key")
    cfg.retention.keep_best = 2
    return cfg


def _files(folder, sizes: list[int], pattern: str) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i, size in enumerate(sizes):
        path = folder / pattern.format(i)
        path.write_bytes(b"\0" * size)
        os.utime(path, (1000 + i, 1000 + i))  # older first
        made.append(path)
    return made


def test_the_serving_the_previous_and_the_best_versions_keep_their_weights(cfg):
    reg = Registry(cfg.registry_path)
    arch = cfg.arch("ptychonn")
    blob = model_to_bytes("ptychonn", arch, PtychoNN(**arch))
    losses = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]  # v1 is the best, v6 the newest
    versions = [
        add_approved(reg, blob, {"kind": "ptychonn", "val_loss": loss}, cfg.security)
        for loss in losses
    ]
    for v in versions:
        reg.mark_accepted(v)
    bragg = model_to_bytes("braggnn", cfg.arch("braggnn"), BraggNN(**cfg.arch("braggnn")))
    b7 = add_approved(reg, bragg, {"kind": "braggnn", "val_loss": 0.01}, cfg.security)
    reg.mark_accepted(b7)
    rejected = reg.add(blob, {"kind": "ptychonn", "val_loss": 9.0})
    reg.mark_rejected(rejected, "quality gate")

    done = retention.prune(cfg, reg)
    # kept: serving v6 and previous v5, the best two v1 v2, braggnn's v7
    assert sorted(done.versions) == [3, 4, rejected]
    for v in (1, 2, 5, 6, b7):
        assert (reg.root / f"v{v:04d}.pt").exists()
    for v in (3, 4):
        assert not (reg.root / f"v{v:04d}.pt").exists() and reg.meta(v)["pruned"]
        assert reg.meta(v)["val_loss"] == losses[v - 1]  # its provenance stays
    assert reg.ranked("ptychonn") == [1, 2, 5, 6]
    assert retention.prune(cfg, reg).versions == []  # idempotent

    loader = ModelLoader(cfg, reg, lambda text, severity: None, print)
    assert loader.slots["ptychonn"].get().version == 6
    with pytest.raises(ModelRejected, match="v3 not loaded: its weights were deleted"):
        loader.load_version(3)
    assert reg.meta(3).get("status") == "accepted"  # pruned, not rejected


def test_labels_files_the_cache_and_parsl_runs_are_kept_within_their_bounds(cfg):
    work = cfg.registry_path / "work"
    cfg.retention.labels_gb = 2.5e-6  # 2,500 bytes: the newest two of 1,000 each
    cfg.retention.cache_gb = 1e-9  # 1 byte: only the newest entry stays, always
    cfg.retention.parsl_runs = 2
    labels = _files(work, [1000] * 5, "labels_ptychonn_{}.h5")
    cache = _files(work / "labels_cache", [500] * 3, "labels_{}.h5")
    runs = []
    for i in range(4):
        run = work / "parsl" / f"{i:03d}"
        (run / "submit_scripts").mkdir(parents=True)
        (run / "parsl.log").write_text("x" * 100)
        os.utime(run, (1000 + i, 1000 + i))
        runs.append(run)
    done = retention.prune(cfg, Registry(cfg.registry_path))
    assert [p.exists() for p in labels] == [False, False, False, True, True]
    assert [p.exists() for p in cache] == [False, False, True]
    assert [p.exists() for p in runs] == [False, False, True, True]
    assert done.freed_bytes == 3 * 1000 + 2 * 500 + 2 * 100
    assert "GB freed" in str(done)


def test_disk_free_is_the_fuller_filesystem_and_a_missing_folder_counts_as_its_parent(cfg):
    free = retention.disk_free_gb(cfg)  # neither folder exists yet
    assert free == pytest.approx(shutil.disk_usage(cfg.data_path.parents[1]).free / 1e9, rel=0.01)
    assert free > 0
