"""Tests of edgeloop.bluesky_plans: spiral geometry, plan messages, and a real scan on the
simulated beamline IOC written to HDF5 by ScanWriter."""

import h5py
import numpy as np
import pytest
from event_model import DocumentNames, schema_validators

from edgeloop.bluesky_plans import (
    ScanWriter,
    ptycho_scan,
    read_scan,
    spiral_positions,
)


@pytest.fixture(scope="module")
def beamline_prefix(system):
    """The session's simulated beamline (one IOC owns the beamline CA port at a time)."""
    return system.prefix


@pytest.fixture(scope="module")
def devices(beamline_prefix):
    """The detector read over PVA (PtychoDetector: frames copied into the events, for an
    IOC without a file plugin) and the stage."""
    from edgeloop.bluesky_plans import PtychoDetector, SampleStage

    det = PtychoDetector(beamline_prefix, name="det")
    stage = SampleStage(beamline_prefix, name="stage")
    det.wait_for_connection(timeout=15)
    stage.wait_for_connection(timeout=15)
    yield det, stage
    det.destroy()
    stage.destroy()


@pytest.mark.timeout(120)
def test_detector_trigger_and_read(devices):
    det, _ = devices
    det.stage()
    try:
        det.trigger().wait(15)
        first = det.read()
        det.trigger().wait(15)
        second = det.read()
    finally:
        det.unstage()
    assert first["det_unique_id"]["value"] == 1 and second["det_unique_id"]["value"] == 2
    assert first["det_image"]["value"].shape == (64, 64)
    desc = det.describe()["det_image"]
    assert desc["dtype"] == "array" and desc["shape"] == [64, 64] and "external" not in desc


@pytest.mark.timeout(120)
def test_ptycho_scan_on_beamline(devices, RE, tmp_path):
    det, stage = devices
    writer = ScanWriter(tmp_path)
    RE.subscribe(writer)
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    (uid,) = RE(ptycho_scan(det, stage, num=20, step=0.05))
    assert len([d for n, d in docs if n == "event"]) == 20
    for name, doc in docs:  # the documents (descriptor with the image key) are schema-valid
        schema_validators[DocumentNames[name]].validate(doc)
    assert int(det.array_counter_rbv.get(use_monitor=False)) == 20  # not restored at unstage

    path = writer.last_path
    assert path is not None and path.exists() and path.parent == tmp_path
    assert path.name.startswith("scan_") and uid[:8] in path.name
    with h5py.File(path, "r") as f:
        assert f["frames"].shape == (20, 64, 64)
        assert f.attrs["exit_status"] == "success" and f.attrs["num_events"] == 20
    scan = read_scan(path)
    np.testing.assert_allclose(scan["positions_um"], spiral_positions(20, 0.05), atol=1e-3)
    np.testing.assert_array_equal(scan["unique_id"], np.arange(1, 21))
    assert scan["uid"] == uid and scan["plan_name"] == "ptycho_scan"
    assert scan["start"]["technique"] == "ptychography"
    frames = scan["frames"].astype(np.float64)
    assert frames.sum() > 0 and (frames.reshape(20, -1).sum(axis=1) > 0).all()
    assert all(not np.array_equal(frames[i], frames[i + 1]) for i in range(19))
    assert np.all(np.diff(scan["timestamps"]) >= 0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.timeout(120)
def test_failed_scan_is_written_and_marked(devices, RE, tmp_path):
    """A run that fails mid-way is still written, with exit_status 'fail' and its frames."""
    from bluesky.preprocessors import msg_mutator

    det, stage = devices
    writer = ScanWriter(tmp_path)
    RE.subscribe(writer)
    saves = []

    def fail_after_three(msg):
        if msg.command == "save":
            saves.append(msg)
        elif msg.command == "checkpoint" and len(saves) == 3:
            raise RuntimeError("simulated beam dump")
        return msg

    with pytest.raises(RuntimeError, match="beam dump"):
        RE(msg_mutator(ptycho_scan(det, stage, num=20, step=0.05), fail_after_three))
    scan = read_scan(writer.last_path)
    assert scan["exit_status"] == "fail" and "beam dump" in scan["reason"]
    assert scan["num_events"] == 3 and scan["frames"].shape == (3, 64, 64)
    np.testing.assert_array_equal(scan["unique_id"], [1, 2, 3])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.timeout(120)
def test_live_table_shows_progress_during_a_scan(devices, RE, capsys):
    """What a scientist sees in IPython: BestEffortCallback's live table, a row per point."""
    from bluesky.callbacks.best_effort import BestEffortCallback

    det, stage = devices
    bec = BestEffortCallback()
    bec.disable_plots()
    RE.subscribe(bec)
    RE(ptycho_scan(det, stage, num=5, step=0.05))
    table = capsys.readouterr().out
    assert "det_unique_id" in table and "stage_x" in table
    rows = [line for line in table.splitlines() if line.startswith("|") and "|" in line[1:]]
    assert len(rows) >= 5 + 1  # header + one row per point
