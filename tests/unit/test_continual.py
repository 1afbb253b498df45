"""Continual learning: a scan is phase-retrieved once, so a growing training set re-labels
only its new scans (remote/tasks.py); warm-started runs fit a sample budget."""

import logging

import h5py
import numpy as np

from edgeloop.bluesky_plans.plans import spiral_positions
from edgeloop.config import Config
from edgeloop.ioc.physics import PtychoSimulator
from edgeloop.remote import tasks
from edgeloop.scanfile import write_scan


def ptycho_scan(path, center, n=24):
    cfg = Config()
    sim = PtychoSimulator(cfg.sim)
    pos = spiral_positions(n, 0.05, center)
    frames = np.stack([sim.frame(x, y) for x, y in pos])
    write_scan(path, "ptychography", frames, np.asarray(pos))
    return str(path)


def request(scans, out, cache, epochs=3):
    cfg = Config()
    return {
        "kind": "ptychonn",
        "scans": scans,
        "out": str(out),
        "pixel_um": cfg.sim.pixel_um,
        "probe": {"radius_px": cfg.sim.probe_radius_px, "defocus": cfg.sim.probe_defocus},
        "epochs": epochs,
        "algorithm": "LSQML",
        "threads": 1,
        "input_size": cfg.model.input_size,
        "cache_dir": str(cache),
    }


def test_each_scan_is_labelled_once_and_the_set_grows(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edgeloop.remote.tasks")
    cache = tmp_path / "cache"
    a = ptycho_scan(tmp_path / "a.h5", (0.0, 0.0))
    first = tasks.analyze(request([a], tmp_path / "l1.h5", cache))
    assert first["n_frames"] == 24 and len(list(cache.glob("labels_*.h5"))) == 1
    b = ptycho_scan(tmp_path / "b.h5", (0.3, 0.0))
    caplog.clear()
    both = tasks.analyze(request([a, b], tmp_path / "l2.h5", cache))
    assert both["n_frames"] == 48
    assert f"labels for {a}: 24 frames (cached)" in caplog.text
    assert f"labels for {b}: 24 frames" in caplog.text and f"{b}: 24 frames (cached)" not in (
        caplog.text
    )
    with h5py.File(tmp_path / "l1.h5") as one, h5py.File(tmp_path / "l2.h5") as two:
        np.testing.assert_array_equal(one["phase"][()], two["phase"][:24])
        np.testing.assert_array_equal(one["inputs"][()], two["inputs"][:24])
    # the cache keeps the reconstruction too, named by its scan
    recons = {}
    for path in cache.glob("labels_*.h5"):
        with h5py.File(path) as c:
            recons[c.attrs["scan"]] = c["recon/object"].shape
    assert set(recons) == {a, b} and all(len(s) == 2 for s in recons.values())
    # a cache written before the positions were kept is used, its positions read afresh
    for path in cache.glob("labels_*.h5"):
        with h5py.File(path, "a") as c:
            del c["positions_px"]
    caplog.clear()
    again = tasks.analyze(request([a, b], tmp_path / "l3.h5", cache))
    assert caplog.text.count("frames (cached)") == 2 and "labelling again" not in caplog.text
    with h5py.File(tmp_path / "l2.h5") as two, h5py.File(again["labels"]) as three:
        np.testing.assert_array_equal(two["positions_px"][()], three["positions_px"][()])


def test_other_settings_or_a_changed_scan_label_again(tmp_path):
    cache = tmp_path / "cache"
    a = ptycho_scan(tmp_path / "a.h5", (0.0, 0.0), n=12)
    key = tasks.labels_cache_file(a, request([a], tmp_path / "x", cache))
    assert key != tasks.labels_cache_file(a, request([a], tmp_path / "x", cache, epochs=4))
    ptycho_scan(tmp_path / "a.h5", (0.1, 0.0), n=12)  # rewritten: new size/mtime
    assert key != tasks.labels_cache_file(a, request([a], tmp_path / "x", cache))
    # a torn cache file is labelled again, not trusted
    tasks.analyze(request([a], tmp_path / "l.h5", cache))
    (torn,) = cache.glob("labels_*.h5")
    torn.write_bytes(b"not hdf5")
    assert tasks.analyze(request([a], tmp_path / "l.h5", cache))["n_frames"] == 12
    with h5py.File(torn) as c:
        assert c.attrs["n"] == 12


def test_sample_budget_shrinks_epochs_as_the_buffer_grows_only_from_a_checkpoint():
    from edgeloop.config import TrainConfig
    from edgeloop.remote.training import epochs_for

    budget = TrainConfig(epochs=40, sample_budget=9000, keep_initial=True)
    assert [epochs_for(budget, n) for n in (100, 450, 900, 2700, 10_000)] == [40, 20, 10, 4, 3]
    assert epochs_for(TrainConfig(epochs=40, sample_budget=9000), 2700) == 40  # from scratch
    assert epochs_for(TrainConfig(epochs=40, keep_initial=True), 2700) == 40  # no budget


def test_the_continual_demo_bounds_each_retraining_unless_configured():
    from edgeloop.app.demo import CONTINUAL_TRAIN_S, continual_settings

    cfg = Config()
    continual_settings(cfg, 500)
    assert cfg.train.sample_budget == 40 * 500 and cfg.train.time_budget_s == CONTINUAL_TRAIN_S
    assert cfg.policy.enabled and cfg.policy.min_new_frames == 125
    own = Config()
    own.train.time_budget_s, own.train.sample_budget = 30.0, 1000
    continual_settings(own, 500)
    assert (own.train.time_budget_s, own.train.sample_budget) == (30.0, 1000)
