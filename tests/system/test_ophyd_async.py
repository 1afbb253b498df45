"""ophyd-async's stock ``SimDetector`` (HDF writer through ``ADWriterFactory.hdf``) on the
simulated beamline's ``det:``, unchanged, with the real RunEngine: ``bluesky.plans.count`` and
edgeloop's ``ptycho_scan`` run, their ``stream_resource``/``stream_datum`` documents point
into the file the simulated NDFileHDF5 wrote, and the frames read back there are the ones the
edge answered (by uniqueId)."""

from pathlib import Path

import h5py
import numpy as np
import pytest

from edgeloop.app.answers import AnswerCollector
from edgeloop.bluesky_plans import RunIndex, ptycho_scan
from edgeloop.bluesky_plans.devices import SampleStage
from edgeloop.scanfile import read_scan
from tests.kit.env import DEADLINE_SLACK
from tests.kit.runs import filed_frames as read_stream
from tests.kit.runs import of, run_engine, run_plan

pytest.importorskip("ophyd_async", reason="edgeloop[async] is not installed")

UIDS = "/entry/instrument/NDAttributes/NDArrayUniqueId"


@pytest.fixture(scope="module")
def engine():
    with run_engine() as RE:  # ophyd-async connects its devices in this engine's loop
        yield RE


@pytest.fixture(scope="module")
def async_detector(system, engine):
    from ophyd_async.core import StaticFilenameProvider, StaticPathProvider, init_devices
    from ophyd_async.epics.adcore import ADWriterFactory
    from ophyd_async.epics.adsimdetector import SimDetector

    folder = Path(system.cfg.data_path, "async")
    folder.mkdir(parents=True, exist_ok=True)
    names = StaticFilenameProvider("async_scan")
    with init_devices(timeout=10 * DEADLINE_SLACK):
        det = SimDetector(
            f"{system.prefix}det:", ADWriterFactory.hdf(StaticPathProvider(names, folder))
        )
    return det, names


def filed_frames(docs) -> tuple[Path, np.ndarray, np.ndarray]:
    """The file the run's stream_resource names, and the frames and uniqueIds its
    stream_datum indices cover, read there."""
    (resource,) = of(docs, "stream_resource")
    assert resource["mimetype"] == "application/x-hdf5"
    return read_stream(docs, UIDS)


@pytest.mark.parametrize("plan", ["count", "ptycho_scan"])
def test_the_stock_async_detector_files_what_the_edge_answers(
    system, engine, async_detector, plan
):
    from bluesky.plans import count

    det, names = async_detector
    names._static_filename = f"async_{plan}"
    phase = AnswerCollector(system.ctx, f"{system.prefix}edge:Phase").wait_connected()
    pixels = AnswerCollector(system.ctx, f"{system.prefix}det:Pva1:Image").wait_connected()
    try:
        if plan == "count":
            docs = run_plan(count([det], num=4), engine=engine)
        else:
            stage = SampleStage(system.prefix, name="stage")
            stage.wait_for_connection(timeout=10 * DEADLINE_SLACK)
            docs = run_plan(ptycho_scan(det, stage, num=6, step=0.05), engine=engine)
        path, frames, uids = filed_frames(docs)
        expect = {int(u) for u in uids}
        system.wait_value("edge:FramesOut", lambda _: expect <= set(phase.items), timeout=30)
        sent = {int(u): pixels.items[int(u)] for u in uids}
    finally:
        phase.close(), pixels.close()

    n = 4 if plan == "count" else 6
    assert path.name == f"async_{plan}.h5" and path.parent.name == "async"
    assert frames.shape == (n, 64, 64) and len(set(uids)) == n
    assert len(of(docs, "event")) == n and len(of(docs, "stream_datum")) == n
    for frame, uid in zip(frames, uids):
        np.testing.assert_array_equal(frame, sent[int(uid)].data)  # the frame the edge took


def test_edgeloops_async_devices_take_both_techniques_and_refuse_out_of_range(system, engine):
    from edgeloop.bluesky_plans import hedm_rotation_scan
    from edgeloop.bluesky_plans.async_devices import make_async_devices

    det, stage = make_async_devices(
        system.prefix, Path(system.cfg.data_path, "async2"), 10 * DEADLINE_SLACK
    )
    with pytest.raises(ValueError, match="outside the limits of stage-x"):
        ptycho_scan(det, stage, num=50, step=5.0)  # refused before any message

    filed, entries = {}, Path(system.cfg.data_path, "async_runs")
    index = engine.subscribe(RunIndex(entries))  # what the retraining finds runs by
    try:
        for name, plan in (
            ("hedm", hedm_rotation_scan(det, stage.rot, 0.0, 3.0, 4)),
            ("ptycho", ptycho_scan(det, stage, num=5, step=0.05)),  # leaves the loop in ptycho
        ):
            docs = run_plan(plan, engine=engine)
            path, frames, uids = filed_frames(docs)
            with h5py.File(path, "r", swmr=True) as f:
                modes = set(f["/entry/instrument/NDAttributes/Mode"][()])
            filed[name] = (frames.shape[0], modes, path.parent.name)
    finally:
        engine.unsubscribe(index)
    assert filed == {"hedm": (4, {b"hedm"}, "async2"), "ptycho": (5, {b"ptycho"}, "async2")}

    # the retraining reads the run whose frames came by stream_resource
    (scan,) = [
        s for s in map(read_scan, entries.glob("run_*.json")) if s["technique"] == "ptychography"
    ]
    events = of(docs, "event")
    positions = [[e["data"]["stage-x"], e["data"]["stage-y"]] for e in events]
    assert scan["complete"] and scan["frames"].shape == (5, 64, 64)
    np.testing.assert_array_equal(scan["unique_id"], uids)
    np.testing.assert_allclose(scan["positions_um"], positions, atol=1e-3)


def test_fly_scans_with_async_devices_file_every_frame_at_its_position(system, engine):
    from edgeloop.bluesky_plans import hedm_fly_scan, ptycho_fly_scan, spiral_positions
    from edgeloop.bluesky_plans.async_devices import make_async_devices

    det, stage = make_async_devices(
        system.prefix, Path(system.cfg.data_path, "async3"), 10 * DEADLINE_SLACK
    )
    entries = Path(system.cfg.data_path, "async_fly_runs")
    phase = AnswerCollector(system.ctx, f"{system.prefix}edge:Phase").wait_connected()
    index = engine.subscribe(RunIndex(entries))
    try:
        hedm = run_plan(hedm_fly_scan(det, stage, 0.0, 4.5, 10, rate_hz=20), engine=engine)
        ptycho = run_plan(ptycho_fly_scan(det, stage, 30, 0.05, rate_hz=50), engine=engine)
        _, frames, uids = filed_frames(ptycho)
        system.wait_value("edge:FramesOut", lambda _: set(map(int, uids)) <= set(phase.items), 30)
    finally:
        engine.unsubscribe(index)
        phase.close()
    assert frames.shape == (30, 64, 64) and len(set(uids)) == 30
    assert filed_frames(hedm)[1].shape[0] == 10 and not of(ptycho, "event")  # datums only
    scans = {s["technique"]: s for s in map(read_scan, entries.glob("run_*.json"))}
    np.testing.assert_allclose(scans["hedm"]["omega_deg"], np.linspace(0, 4.5, 10), atol=1e-6)
    positions = scans["ptychography"]["positions_um"]
    np.testing.assert_allclose(positions, spiral_positions(30, 0.05), atol=1e-6)
    assert await_trigger_mode(det) == "Internal"  # left as a step scan needs it


def await_trigger_mode(det) -> str:
    from bluesky.run_engine import call_in_bluesky_event_loop

    return call_in_bluesky_event_loop(det.trigger_mode.get_value())
