"""Retraining reads what the detector wrote (issue 12, item 4): ``RunIndex`` records each run
as a reference to the areaDetector files its documents point to (``run_*.json``, written
whole at the stop document), and ``read_scan`` reads the frames, uniqueIds, timestamps and
positions from those files, never half of a row the file plugin is still writing.  The
retraining service lists the entries beside ScanWriter's files and skips what it cannot
read.  The system tests run the real plans on the simulated beamline's areaDetector."""

from pathlib import Path

import numpy as np
import pytest

from edgeloop.bluesky_plans import RunIndex
from edgeloop.remote.scan_index import usable_scans
from edgeloop.scanfile import read_scan, scan_summary
from tests.kit.env import ca_port
from tests.kit.runs import run_engine


@pytest.fixture(scope="module")
def beamline(tmp_path_factory, request):
    from tests.kit.areadetector import beamline_ioc

    with beamline_ioc(tmp_path_factory.mktemp("ri"), ca_port("run_index"), request) as ioc:
        yield ioc


@pytest.fixture(scope="module")
def devices(beamline, tmp_path_factory):
    from edgeloop.bluesky_plans import SimDetector, make_ad_devices

    data = beamline.cfg.data_path / "frames"  # where the simulation may write
    data.mkdir(parents=True, exist_ok=True)
    det, stage = make_ad_devices(beamline.prefix, data, timeout=15, detector_class=SimDetector)
    yield det, stage
    for device in (det, stage):
        device.destroy()


def run_indexed(plan, det, index_dir: Path):
    """Run ``plan`` with a RunIndex; the documents, the entry, and the scan read from the
    entry at the stop document (while the IOC still has the file open: Capture is 1)."""
    docs, at_stop = [], {}
    index = RunIndex(index_dir)

    def read_at_stop(name, doc):
        at_stop["capture"] = det.hdf1.capture.get(use_monitor=False)
        at_stop["scan"] = read_scan(index.last_path)

    with run_engine() as RE:
        RE.subscribe(lambda name, doc: docs.append((name, doc)))
        RE.subscribe(index)
        RE.subscribe(read_at_stop, "stop")
        RE(plan)
    assert not index.errors
    return docs, index.last_path, at_stop


def events_of(docs, key: str) -> np.ndarray:
    return np.array([doc["data"][key] for name, doc in docs if name == "event"], float)


def test_a_ptycho_scan_is_read_from_the_detectors_file(devices, tmp_path):
    from edgeloop.bluesky_plans import ptycho_scan
    from tests.kit.areadetector import read_back

    det, stage = devices
    docs, entry, at_stop = run_indexed(ptycho_scan(det, stage, num=12, step=0.05), det, tmp_path)
    scan = read_scan(entry)
    _, frames = read_back(docs)  # through the AD_HDF5 handler, as databroker reads them
    np.testing.assert_array_equal(scan["frames"], frames)
    np.testing.assert_array_equal(scan["unique_id"], np.arange(1, 13))
    positions = np.column_stack([events_of(docs, "stage_x"), events_of(docs, "stage_y")])
    np.testing.assert_allclose(scan["positions_um"], positions, atol=1e-3)
    (start,), (stop,) = ([d for n, d in docs if n == kind] for kind in ("start", "stop"))
    assert np.all((start["time"] - 1 < scan["timestamps"]) & (scan["timestamps"] < stop["time"]))
    assert np.all(np.diff(scan["timestamps"]) > 0)
    assert (scan["technique"], scan["uid"], scan["scan_id"]) == (
        "ptychography",
        start["uid"],
        start["scan_id"],
    )
    assert scan["complete"] and scan["exit_status"] == "success" and scan["num_events"] == 12
    # read at the stop document, from the file its SWMR writer still had open
    assert at_stop["capture"] == 1
    np.testing.assert_array_equal(at_stop["scan"]["frames"], frames)
    assert usable_scans(tmp_path) == [(str(entry), "ptychography", 12)]


def test_an_hedm_rotation_scan_gives_omega_from_the_file(devices, tmp_path):
    from edgeloop.bluesky_plans import hedm_rotation_scan
    from tests.kit.areadetector import read_back

    det, stage = devices
    # the plan sets the mode and shows the file plugin an HEDM frame before staging (it
    # opens its file with the size of the last frame it saw, as NDFileHDF5 does)
    docs, entry, _ = run_indexed(hedm_rotation_scan(det, stage.rot, 0.0, 2.0, 5), det, tmp_path)
    scan = read_scan(entry)
    _, frames = read_back(docs)
    assert scan["technique"] == "hedm" and "positions_um" not in scan
    np.testing.assert_array_equal(scan["frames"], frames)
    np.testing.assert_allclose(scan["omega_deg"], events_of(docs, "stage_rot"), atol=1e-3)
    np.testing.assert_allclose(scan["omega_deg"], np.linspace(0.0, 2.0, 5), atol=1e-3)
    np.testing.assert_array_equal(scan["unique_id"], np.arange(1, 6))
    assert scan_summary(entry) == ("hedm", 5)
