"""Fly scans (issue 12 item 3): the simulated stage follows its path under the trajectory
controller ``$(P)Prof1:`` while the detector, in TriggerMode External, takes one frame per
pulse stamped with the latched positions; ophyd's flyer protocol through the real
RunEngine emits one event per frame pointing into the detector's HDF5 file, and the edge
answers the flown frames."""

import threading
import time

import h5py
import numpy as np
import pytest
from bluesky.utils import FailedStatus

from edgeloop.app.answers import AnswerCollector
from edgeloop.bluesky_plans import (
    hedm_fly_scan,
    make_devices,
    ptycho_fly_scan,
    ptycho_scan,
    spiral_positions,
)
from tests.kit.runs import of, run_plan

ATTRIBUTES = "/entry/instrument/NDAttributes"


@pytest.fixture(scope="module")
def devices(system, tmp_path_factory):
    det, stage = make_devices(system.prefix, system.cfg.data_path / "fly", timeout=15)
    yield det, stage
    det.destroy()
    stage.destroy()


def events(docs) -> list[dict]:
    """Events, unpacked from the event pages collect emits."""
    out = [doc for name, doc in docs if name == "event"]
    for page in of(docs, "event_page"):
        for i, seq in enumerate(page["seq_num"]):
            out.append(
                {
                    "seq_num": seq,
                    "time": page["time"][i],
                    "data": {k: v[i] for k, v in page["data"].items()},
                    "timestamps": {k: v[i] for k, v in page["timestamps"].items()},
                }
            )
    return sorted(out, key=lambda e: e["seq_num"])


def test_ptycho_fly_scan_stamps_every_frame_with_its_spiral_point(system, devices):
    det, stage = devices
    num, step, rate = 200, 0.05, 200.0
    outputs = AnswerCollector(system.ctx, f"{system.prefix}edge:Phase")
    t0 = time.perf_counter()
    docs = run_plan(ptycho_fly_scan(det, stage, num=num, step=step, rate_hz=rate))
    seconds = time.perf_counter() - t0
    start, stop = of(docs, "start")[0], of(docs, "stop")[0]
    assert stop["exit_status"] == "success", stop
    assert start["plan_name"] == "ptycho_fly_scan" and start["fly"] and start["rate_hz"] == rate
    assert stop["num_events"] == {"primary": num}
    evs = events(docs)
    assert len(evs) == num
    # one resource, one datum per frame, each event's image is one of them
    (resource,) = of(docs, "resource")
    assert resource["spec"] == "AD_HDF5" and resource["resource_kwargs"]["frame_per_point"] == 1
    datums = of(docs, "datum")
    assert [d["datum_kwargs"]["point_number"] for d in datums] == list(range(num))
    assert [e["data"]["det_image"] for e in evs] == [d["datum_id"] for d in datums]
    # positions: the spiral points, latched per frame; uniqueIds restart at 1
    expected = spiral_positions(num, step)
    got = np.array([[e["data"]["stage_x"], e["data"]["stage_y"]] for e in evs])
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert [e["data"]["det_unique_id"] for e in evs] == list(range(1, num + 1))
    # bluesky stamps an event when it composes it: the frame's own time is in timestamps
    times = np.array([e["timestamps"]["det_image"] for e in evs])
    assert np.all(np.diff(times) > 0)
    # paced by the trajectory: 200 points at 200 Hz take about a second
    assert 0.5 < times[-1] - times[0] < 5.0, times[-1] - times[0]
    # the file holds the same frames and stamps
    path = f"{resource['root']}/{resource['resource_path']}"
    with h5py.File(path, "r", swmr=True) as f:
        assert f["/entry/data/data"].shape == (num, 64, 64)
        np.testing.assert_allclose(f[f"{ATTRIBUTES}/SampleX"][:], expected[:, 0])
        np.testing.assert_allclose(f[f"{ATTRIBUTES}/SampleY"][:], expected[:, 1])
    # the edge answered each flown frame at the stamped position
    answered = {f.unique_id: f for f in outputs.wait(num, 30)}
    outputs.close()
    assert sorted(answered) == list(range(1, num + 1))
    for uid, frame in answered.items():
        assert float(frame.attributes["SampleX"]) == pytest.approx(expected[uid - 1, 0])
    # label-free quality: all but the first frames overlap the map and carry their disagreement
    consistent = [
        f.attributes["Consistency"] for f in answered.values() if "Consistency" in f.attributes
    ]
    assert len(consistent) > 0.9 * num and min(consistent) >= 0
    scan = system.wait_value("edge:ScanConsistency", lambda v: v > 0, 10)
    assert scan == pytest.approx(np.mean(consistent), rel=0.05)
    assert system.pv("edge:ScanConsistency")["display.units"] == "rad"
    print(f"fly scan: {num} frames at {rate:g} Hz in {seconds:.1f} s of plan")


def test_hedm_fly_scan_rotates_through_the_angles(system, devices):
    det, stage = devices
    docs = run_plan(hedm_fly_scan(det, stage, 10.0, 19.0, 10, rate_hz=20))
    assert of(docs, "stop")[0]["exit_status"] == "success"
    evs = events(docs)
    np.testing.assert_allclose([e["data"]["stage_rot"] for e in evs], np.linspace(10, 19, 10))
    assert det.mode.get() == "hedm"
    assert stage.rot.position == pytest.approx(19.0)


def test_step_scans_still_work_after_a_fly_scan(system, devices):
    det, stage = devices
    docs = run_plan(ptycho_scan(det, stage, num=5, step=0.05))
    assert of(docs, "stop")[0]["exit_status"] == "success"
    evs = events(docs)
    assert len(evs) == 5
    assert det.cam.trigger_mode.get(as_string=True) == "Internal"


def test_a_profile_outside_the_limits_is_refused_before_anything_moves(system, devices):
    det, stage = devices
    with pytest.raises(ValueError, match="limits"):
        ptycho_fly_scan(det, stage, num=963, step=5.0)
    with pytest.raises(ValueError, match="rate_hz"):
        ptycho_fly_scan(det, stage, num=10, rate_hz=0)


def test_an_aborted_profile_fails_the_plan_and_stops_the_detector(system, devices):
    det, stage = devices
    num = 400

    def abort_soon():
        deadline = time.monotonic() + 30
        while stage.profile.execute_state.get(use_monitor=False) != "Executing":
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        time.sleep(0.5)
        stage.profile.abort.put(1)

    threading.Thread(target=abort_soon, daemon=True).start()
    docs = []
    with pytest.raises(FailedStatus) as failed:
        run_plan(ptycho_fly_scan(det, stage, num=num, step=0.05, rate_hz=100), docs)
    assert "profile Abort: aborted at point" in str(failed.value.args[0].exception())
    # the frames flown before the abort are collected into the failed run
    stop = of(docs, "stop")[0]
    assert stop["exit_status"] == "fail"
    taken = stop["num_events"]["primary"]
    assert 0 < taken < num
    assert len(of(docs, "datum")) == taken
    np.testing.assert_allclose(
        [[e["data"]["stage_x"], e["data"]["stage_y"]] for e in events(docs)],
        spiral_positions(num, 0.05)[:taken],
    )
    deadline = time.monotonic() + 5
    while det.cam.acquire.get(use_monitor=False) != 0:
        assert time.monotonic() < deadline, "detector still acquiring"
        time.sleep(0.1)
    assert det.cam.trigger_mode.get(as_string=True) == "Internal"
