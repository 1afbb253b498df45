"""The detector as beamlines run it (issue 12, first part): the simulated beamline's
``det:cam1:`` and ``det:HDF1:`` records driven by ophyd's stock areaDetector classes
(:class:`~edgeloop.bluesky_plans.devices.AreaDetector`) and the real RunEngine.  Frames go
to an HDF5 file in areaDetector's layout, the documents point into it (resource/datum), and
reading them back with the handler registered for the resource's spec (area-detector-handlers,
as databroker does) gives the frames the PVA stream carried.  The same ``count`` plan runs
unchanged against an independent areaDetector-like server (tests/ad_server.py)."""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest

from edgeloop.app.answers import AnswerCollector
from edgeloop.bluesky_plans import ptycho_scan, spiral_positions
from edgeloop.bluesky_plans.devices import whole_text
from edgeloop.waiting import wait_until
from tests.kit.areadetector import beamline_ioc, read_back
from tests.kit.env import KIT, TEST_ENV, ca_port, random_prefix
from tests.kit.runs import of, run_plan

# the module's beamline; servers that a single test starts for itself
BEAMLINE_PORT, OWN_PORT = (ca_port("area_detector"), ca_port("area_detector_own"))
ATTRIBUTES = "/entry/instrument/NDAttributes"
EPICS_EPOCH = 631152000


@pytest.fixture(scope="module")
def beamline(tmp_path_factory, request):
    with beamline_ioc(tmp_path_factory.mktemp("ad"), BEAMLINE_PORT, request) as ioc:
        yield ioc


@pytest.fixture(scope="module")
def devices(beamline, tmp_path_factory):
    from edgeloop.bluesky_plans import make_ad_devices

    data = beamline.cfg.data_path / "frames"  # where the simulation may write
    data.mkdir(parents=True, exist_ok=True)
    data = data.resolve()
    det, stage = make_ad_devices(beamline.prefix, data, timeout=15)
    yield det, stage, data
    det.destroy()
    stage.destroy()


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    wait_until(predicate, timeout, what)


def pva_frames(stream: AnswerCollector, unique_ids) -> dict:
    """The frames the PVA stream carried, by uniqueId, once all of ``unique_ids`` came."""

    def received() -> dict:
        with stream.lock:
            return {f.unique_id: f for f in stream.frames}

    wanted = {int(u) for u in unique_ids}
    wait_for(lambda: wanted <= set(received()), what="PVA frames")
    return received()


def test_count_files_the_frames_in_hdf5_and_the_events_carry_datum_ids(beamline, devices):
    from bluesky.plans import count

    det, _, data = devices
    det.cam.num_images.put(10, wait=True)  # left by someone else: staging makes it 1 per point
    stream = AnswerCollector(beamline.ctx, f"{beamline.prefix}det:Pva1:Image")
    try:
        docs = run_plan(count([det], num=5))
        path, frames = read_back(docs)
        with h5py.File(path, "r", swmr=True) as f:
            assert f["/entry/data/data"].shape == (5, 64, 64)
            np.testing.assert_array_equal(
                f["/entry/instrument/detector/data"], f["/entry/data/data"]
            )
            assert f["/entry"].attrs["NX_class"] == "NXentry"
            unique_ids = f[f"{ATTRIBUTES}/NDArrayUniqueId"][()]
            stamps = f[f"{ATTRIBUTES}/NDArrayTimeStamp"][()] + EPICS_EPOCH
            modes = f[f"{ATTRIBUTES}/Mode"][()]
            assert f[f"{ATTRIBUTES}/SampleX"].shape == (5,)
            assert f["/entry/instrument/detector/NDAttributes/ColorMode"].shape == (5,)
        received = pva_frames(stream, unique_ids)
    finally:
        stream.close()

    names = [name for name, _ in docs]
    assert names.count("resource") == 1 and names.count("datum") == names.count("event") == 5
    (descriptor,) = of(docs, "descriptor")
    key = descriptor["data_keys"]["det_image"]
    assert key["external"] == "FILESTORE:" and list(key["shape"]) == [1, 64, 64]
    assert key["dtype_numpy"] == "<i4"
    (resource,) = of(docs, "resource")
    assert resource["spec"] == "AD_HDF5" and resource["resource_kwargs"] == {"frame_per_point": 1}
    events = of(docs, "event")
    assert [e["data"]["det_image"] for e in events] == [d["datum_id"] for d in of(docs, "datum")]
    assert all(e["filled"] == {"det_image": False} for e in events)  # ids, not frames

    assert path.parent == data and path.exists()
    assert frames.shape == (5, 64, 64) and frames.dtype == np.int32
    np.testing.assert_array_equal(np.diff(unique_ids), 1)
    assert set(modes) == {b"ptycho"}
    for frame, uid, stamp in zip(frames, unique_ids, stamps):
        np.testing.assert_array_equal(frame, received[uid].data)
        assert abs(stamp - received[uid].timestamp) < 1e-6


def test_ptycho_step_scan_files_each_frame_with_its_stage_position(beamline, devices):
    det, stage, _ = devices
    stream = AnswerCollector(beamline.ctx, f"{beamline.prefix}det:Pva1:Image")
    try:
        docs = run_plan(ptycho_scan(det, stage, num=10, step=0.05))
        path, frames = read_back(docs)
        with h5py.File(path, "r", swmr=True) as f:
            unique_ids = f[f"{ATTRIBUTES}/NDArrayUniqueId"][()]
            filed = np.column_stack([f[f"{ATTRIBUTES}/SampleX"], f[f"{ATTRIBUTES}/SampleY"]])
        received = pva_frames(stream, unique_ids)
    finally:
        stream.close()

    events = of(docs, "event")
    assert len(events) == 10 and frames.shape == (10, 64, 64)
    positions = np.array([[e["data"]["stage_x"], e["data"]["stage_y"]] for e in events])
    np.testing.assert_allclose(positions, spiral_positions(10, 0.05), atol=1e-3)
    np.testing.assert_allclose(filed, positions, atol=1e-9)  # each frame where its event was
    for frame, uid, position in zip(frames, unique_ids, filed):
        np.testing.assert_array_equal(frame, received[uid].data)
        attributes = received[uid].attributes
        np.testing.assert_allclose([attributes["SampleX"], attributes["SampleY"]], position)


def test_a_path_the_ioc_lacks_fails_staging_with_the_reason(devices, tmp_path):
    det, _, data = devices
    missing = data / "not" / "there"
    det.hdf1.write_path_template = f"{missing}/"
    try:
        with pytest.raises(OSError, match="FilePathExists_RBV is 0"):
            det.stage()
        assert det.hdf1.file_path_exists.get(use_monitor=False) == 0
    finally:
        det.hdf1.write_path_template = f"{data}/"
    assert not missing.exists()
    det.stage()  # the device and the IOC go on
    det.unstage()


def test_the_simulation_writes_only_under_its_data_directory(devices, tmp_path):
    """Issue 22 item 9: a CA client naming a path elsewhere (FilePath, or a FileName that
    climbs out) gets FilePathExists_RBV 0 and a WriteMessage; nothing is made there."""
    det, _, data = devices
    hdf = det.hdf1
    elsewhere = tmp_path / "accepted.json"  # what an overwrite would target
    elsewhere.write_text("keep me")
    mode = hdf.file_write_mode.get()
    try:
        hdf.file_path.set(f"{tmp_path}/").wait(10)
        assert hdf.file_path_exists.get(use_monitor=False) == 0
        assert "outside the simulation's data directory" in whole_text(hdf.write_message)
        hdf.file_path.set(f"{data}/").wait(10)
        assert hdf.file_path_exists.get(use_monitor=False) == 1
        climb = os.path.relpath(elsewhere, data).removesuffix(".json")
        hdf.file_name.set(climb).wait(10)
        hdf.file_template.set("%s%s.json").wait(10)
        hdf.file_write_mode.set(2).wait(10)  # Stream: Capture opens the file at once
        hdf.capture.put(1)
        wait_for(
            lambda: (
                "outside the simulation's" in whole_text(hdf.write_message)
                and hdf.capture.get(use_monitor=False) == 0
            ),
            what="the capture refused",
        )
    finally:
        hdf.file_template.set("%s%s_%6.6d.h5").wait(10)
        hdf.file_write_mode.set(mode).wait(10)
        hdf.file_path.set(f"{data}/").wait(10)
    assert elsewhere.read_text() == "keep me"


def test_create_directory_makes_only_the_last_levels(beamline, devices):
    from ophyd import EpicsSignalWithRBV

    det, _, data = devices
    tmp_path = data / "created"
    tmp_path.mkdir()
    create = EpicsSignalWithRBV(f"{beamline.prefix}det:HDF1:CreateDirectory", name="create")
    try:
        create.wait_for_connection(timeout=10)
        create.set(-2).wait(5)
        det.hdf1.file_path.set(f"{tmp_path}/a/b/").wait(10)
        assert det.hdf1.file_path_exists.get(use_monitor=False) == 1
        assert (tmp_path / "a" / "b").is_dir()
        det.hdf1.file_path.set(f"{tmp_path}/c/d/e/").wait(10)  # three levels missing
        assert det.hdf1.file_path_exists.get(use_monitor=False) == 0
        assert not (tmp_path / "c").exists()
    finally:
        create.set(0).wait(5)
        create.destroy()


def test_a_write_error_stops_capture_and_the_ioc_stays_up(beamline, devices):
    from bluesky.plans import count

    det, _, _ = devices
    hdf = det.hdf1
    ioc = psutil.Process(beamline.procs["ioc"].proc.pid)
    # As a full disk would: the IOC may grow no file past 256 KiB (a frame is 16 KiB).
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG.  (Only the soft
    # limit: raising a hard limit back needs a privilege.)
    _, hard = ioc.rlimit(psutil.RLIMIT_FSIZE)
    ioc.rlimit(psutil.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        run_plan(count([det], num=30))
    finally:
        ioc.rlimit(psutil.RLIMIT_FSIZE, (hard, hard))
    message = whole_text(hdf.write_message)
    assert hdf.write_status.get(use_monitor=False) == 1, message
    assert "File too large" in message, message
    assert hdf.capture.get(use_monitor=False) == 0
    assert 0 < hdf.num_captured.get(use_monitor=False) < 30
    assert beamline.procs["ioc"].alive()
    docs = run_plan(count([det], num=2))  # the next run is filed whole
    _, frames = read_back(docs)
    assert frames.shape == (2, 64, 64)
    assert hdf.write_status.get(use_monitor=False) == 0


def test_capture_before_any_frame_or_in_single_mode_is_refused(tmp_path, request):
    from ophyd.utils.errors import UnprimedPlugin

    from edgeloop.bluesky_plans import AreaDetector

    with beamline_ioc(tmp_path, OWN_PORT, request) as ioc:
        data = ioc.cfg.data_path.resolve()
        data.mkdir(parents=True, exist_ok=True)
        det = AreaDetector(f"{ioc.prefix}det:", name="fresh", write_path_template=f"{data}/")
        hdf = det.hdf1

        def message() -> str:
            return whole_text(hdf.write_message)

        try:
            det.wait_for_connection(timeout=20)
            with pytest.raises(UnprimedPlugin):
                det.stage()  # ophyd knows the plugin must see a frame first
            hdf.file_write_mode.set(2).wait(5)  # Stream
            hdf.capture.put(1)  # and the IOC refuses, as areaDetector does
            wait_for(lambda: "must collect an array" in message(), what="the refusal")
            assert hdf.write_status.get(use_monitor=False) == 1
            assert hdf.capture.get(use_monitor=False) == 0

            hdf.warmup()
            hdf.file_write_mode.set(0).wait(5)  # Single
            hdf.capture.put(1)
            wait_for(lambda: "capture not supported in Single mode" in message(), what="refusal")
            assert hdf.capture.get(use_monitor=False) == 0
            det.stage()  # primed: stages, and captures in Stream mode
            assert hdf.capture.get(use_monitor=False) == 1
            assert hdf.write_status.get(use_monitor=False) == 0
            det.unstage()
            assert Path(hdf.full_file_name.get(use_monitor=False)).exists()
        finally:
            det.destroy()


@pytest.fixture
def independent_server(tmp_path):
    """tests/ad_server.py, an areaDetector-like server that shares nothing with edgeloop."""
    prefix = random_prefix("i")
    env = dict(os.environ, **TEST_ENV, EPICS_CA_SERVER_PORT=str(OWN_PORT))
    log_path = tmp_path / "ad_server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(KIT / "ad_server.py"), prefix],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield prefix
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(log_path.read_text()[-2000:])


def test_the_same_count_plan_runs_unchanged_on_an_independent_area_detector(
    independent_server, tmp_path
):
    from bluesky.plans import count

    from edgeloop.bluesky_plans import AreaDetector
    from tests.kit.ad_server import frame

    det = AreaDetector(independent_server, name="det", write_path_template=f"{tmp_path}/")
    try:
        det.wait_for_connection(timeout=20)
        docs = run_plan(count([det], num=3))
    finally:
        det.destroy()
    (descriptor,) = of(docs, "descriptor")
    key = descriptor["data_keys"]["det_image"]
    assert list(key["shape"]) == [1, 24, 32] and key["dtype_numpy"] == "<u2"
    path, frames = read_back(docs)
    assert path.parent == tmp_path
    with h5py.File(path, "r") as f:
        unique_ids = f[f"{ATTRIBUTES}/NDArrayUniqueId"][()]
    assert len(unique_ids) == 3
    for data, uid in zip(frames, unique_ids):
        np.testing.assert_array_equal(data, frame(uid))
