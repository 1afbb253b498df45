"""Continual learning: a scan is phase-retrieved once, so a growing training set re-labels
only its new scans (remote/tasks.py); warm-started runs fit a sample budget."""

import pytest


@pytest.mark.timeout(900)
def test_demo_scans_lets_the_policy_retrain_and_reports_each_scan(tmp_path):
    """``edgeloop demo --scans 2`` end to end on small settings, its runs in the embedded
    Tiled server as by default: the policy retrains after each scan by itself (the
    untrained model's consistency, then new unlike data), and the report, the learning
    curve and the maps are written."""
    import json
    import os
    import subprocess
    import sys

    from tests.kit.env import TEST_ENV, free_port, random_prefix
    from tests.kit.servers import small_config

    cfg, config = small_config(tmp_path, random_prefix("d"))
    cfg.tiled.enabled, cfg.tiled.port = True, free_port()  # the demo's runs, as a user's
    cfg.dump(config)
    out = tmp_path / "demo"
    env = dict(os.environ, **TEST_ENV, EDGELOOP_BEAMLINE_CA_PORT=str(free_port()))
    args = ["demo", "--scans", "2", "--points", "80", "--epochs", "2", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "edgeloop.app.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=840,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads((out / "report.json").read_text())
    first, second = report["scans"]
    assert first["model_version"] == 0 and first["trigger"].startswith("policy: ")
    assert second["model_version"] == first["model_after"] > 0
    assert second["trigger"] and second["trigger"].startswith("policy: ")
    for scan in report["scans"]:
        assert scan["frames"] == 80 and 0 < scan["phase_error"] < 1
        assert 0 < scan["consistency"] < 1 and 0 < scan["recon_error"] < scan["phase_error"]
        assert scan["map_ratio"] == pytest.approx(scan["map_error"] / scan["recon_error"])
    assert first["reference_error"] is None  # no trained model yet: nothing to check
    log = (out / "logs" / "retrain-service.log").read_text()
    assert second["reference_error"] is not None, (second["reference_info"], log[-4000:])
    assert 0 < second["reference_error"] < 1
    assert -1 <= report["consistency_error_spearman"] <= 1
    assert report["frames_in"] == report["frames_out"] + report["dropped"] + report["bad_frames"]
    for png in ("learning_curve.png", "scan_maps.png"):
        assert (out / png).stat().st_size > 10_000
    assert "trigger after the scan" in done.stdout and "map/rec" in done.stdout
