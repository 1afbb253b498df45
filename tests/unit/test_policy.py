"""The retraining policy's decisions (remote/policy.py), on positions with known overlap."""

import numpy as np

from edgeloop.config import PolicyConfig
from edgeloop.remote.policy import RetrainPolicy, Settings


def grid(x0: float, n: int = 10, step: float = 0.05) -> np.ndarray:
    """n x n stage positions (um) starting at (x0, 0)."""
    xs, ys = np.meshgrid(x0 + step * np.arange(n), step * np.arange(n))
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def on(**kw) -> Settings:
    return Settings(**{**vars(Settings.of(PolicyConfig(enabled=True))), **kw})


def test_disabled_policy_never_triggers():
    policy = RetrainPolicy(PolicyConfig())
    policy.observe("a.h5", "ptychography", grid(0), quality=5.0)
    assert policy.decide(on(enabled=False), now=100) is None
    assert "ScanConsistency 5" in policy.decide(on(), now=100)


def test_quality_above_threshold_triggers_once_per_scan():
    policy = RetrainPolicy(PolicyConfig(novelty_um=0.1))
    policy.trained("ptychography", [grid(0)], now=None)
    policy.observe("same.h5", "ptychography", grid(0), quality=0.05)
    assert policy.decide(on(threshold=0.08, min_new_frames=1), now=0) is None  # good, seen
    policy.observe("bad.h5", "ptychography", grid(0), quality=0.2)
    reason = policy.decide(on(threshold=0.08), now=0)
    assert reason.startswith("policy: edge:ScanConsistency 0.2 > ml:AutoThreshold 0.08")
    assert "bad.h5" in reason
    policy.trained("ptychography", [grid(0)], now=0)
    assert policy.pending == [] and policy.decide(on(threshold=0.08), now=1000) is None


def test_unlike_frames_count_by_distance_from_the_training_set():
    policy = RetrainPolicy(PolicyConfig(novelty_um=0.1))
    assert policy.unlike("ptychography", grid(0)) == 100  # nothing trained: all new
    policy.trained("ptychography", [grid(0)], now=None)
    assert policy.unlike("ptychography", grid(0)) == 0
    # shifted by 0.25 um: the first 3 columns (x 0.25 .. 0.35, 0.45 within 0.1 of 0.45) ...
    shifted = grid(0.25)
    far = np.min(np.linalg.norm(shifted[:, None] - grid(0)[None], axis=2), axis=1) > 0.1
    assert policy.unlike("ptychography", shifted) == far.sum() > 0
    policy.observe("new.h5", "ptychography", shifted, quality=None)
    settings = on(min_new_frames=int(far.sum()))
    assert f"{far.sum()} new ptychography frames unlike" in policy.decide(settings, now=0)
    assert policy.decide(on(min_new_frames=int(far.sum()) + 1), now=0) is None


def test_each_technique_has_its_own_quality_threshold():
    policy = RetrainPolicy(PolicyConfig())
    policy.trained("hedm", [np.arange(0, 90.0)], now=None)
    policy.observe("h.h5", "hedm", np.arange(0, 90.0), quality=0.3)  # px
    settings = on(threshold=0.08, threshold_px=0.4, min_new_frames=1)
    assert policy.decide(settings, now=0) is None  # 0.3 px is good for BraggNN
    policy.observe("h2.h5", "hedm", np.arange(0, 90.0), quality=0.9)
    assert "edge:ScanConsistency 0.9 > ml:AutoThresholdPx 0.4" in policy.decide(settings, 0)


def test_minimum_interval_and_techniques_apart():
    policy = RetrainPolicy(PolicyConfig())
    policy.trained("hedm", [np.arange(0, 90.0)], now=10.0)
    policy.observe("h.h5", "hedm", np.arange(0, 180.0), quality=None)  # 90 unlike
    assert policy.decide(on(min_new_frames=50, min_interval_s=60), now=30) is None
    assert "90 new hedm frames" in policy.decide(on(min_new_frames=50, min_interval_s=60), 71)
    # a ptychography scan is newer: HEDM's pending data wait; the newest technique decides
    policy.observe("p.h5", "ptychography", grid(0, n=3), quality=None)
    assert policy.decide(on(min_new_frames=50, min_interval_s=0), now=100) is None
    policy.trained("ptychography", [grid(0, n=3)], now=100)
    assert [s.path for s in policy.pending] == ["h.h5"]


def test_non_finite_positions_are_left_out():
    policy = RetrainPolicy(PolicyConfig())
    pos = grid(0, n=2)
    pos[0] = np.nan
    scan = policy.observe("n.h5", "ptychography", pos, quality=float("nan"))
    assert scan.unlike == 3
    assert policy.decide(on(threshold=0.0, min_new_frames=99), now=0) is None


def test_the_scan_figure_is_the_one_posted_while_its_frames_came():
    from edgeloop.remote.policy import quality_during

    # posted every 0.5 s: scan A's frames 100-110 s, scan B's from 110.3 s (back to back)
    history = [(99.5, 0.02), (100.5, 0.09), (105.0, 0.08), (110.2, 0.07), (110.7, 0.03)]
    assert quality_during(history, 100.0, 110.0, settle_s=0.25) == 0.07  # not B's 0.03
    assert quality_during(history, 110.3, 111.0, settle_s=1.0) == 0.03
    assert quality_during(history, 200.0, 210.0) is None  # nothing posted then
    assert quality_during([(100.5, float("nan"))], 100.0, 101.0) is None


def test_a_retraining_that_fails_before_staging_is_asked_again_only_after_the_interval(
    tmp_path,
):
    """Issue 22 item 11: a bad key file, an executor that will not start: the run ends
    before the policy hears what it trained on, and the policy waits AutoMinInterval."""
    from edgeloop.config import Config
    from edgeloop.registry import Registry
    from edgeloop.remote.policy_watcher import PolicyWatcher
    from edgeloop.scanfile import write_scan

    cfg = Config(data_dir=str(tmp_path / "data"), registry_dir=str(tmp_path / "models"))
    cfg.tiled.enabled = False  # the scans are files in data_dir
    cfg.data_path.mkdir()
    write_scan(
        cfg.data_path / "scan_1_aaaa.h5", "ptychography", np.zeros((8, 8, 8)), grid(0, 3)[:8]
    )
    asked = []
    watcher = PolicyWatcher(cfg, Registry(cfg.registry_path), lambda: False, asked.append)
    watcher.settings = on(min_interval_s=3600, min_new_frames=1)
    for _ in range(20):  # 20 polls; each retraining asked for fails at once
        watcher.step()
    assert len(asked) == 1 and "unlike the training set" in asked[0]
    watcher.settings.min_interval_s = 0
    watcher.step()
    assert len(asked) == 2
