"""Tests of edgeloop.bluesky_plans: spiral geometry, plan messages, and a real scan on the
simulated beamline IOC written to HDF5 by ScanWriter."""

import logging

import h5py
import numpy as np
import pytest

from edgeloop.bluesky_plans import (
    ScanWriter,
    hedm_rotation_scan,
    ptycho_scan,
    read_scan,
    spiral_positions,
)
from tests.kit.scans import sim_devices as kit_sim_devices

log = logging.getLogger(__name__)


def _nn_distances(points: np.ndarray) -> np.ndarray:
    d = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    return d.min(axis=1)


@pytest.mark.parametrize("num", [1, 2, 20, 963])
def test_spiral_count_and_center(num):
    pos = spiral_positions(num, 0.05, center=(0.3, -0.2))
    assert pos.shape == (num, 2)
    np.testing.assert_allclose(pos[0], [0.3, -0.2])


@pytest.mark.parametrize("step", [0.05, 0.2])
def test_spiral_spacing(step):
    pos = spiral_positions(500, step)
    median = float(np.median(_nn_distances(pos)))
    assert abs(median - step) < 0.2 * step, median


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num": 0, "step_um": 0.05},
        {"num": -3, "step_um": 0.05},
        {"num": 10, "step_um": 0.0},
        {"num": 10, "step_um": -1.0},
        {"num": 10, "step_um": float("nan")},
        {"num": 10, "step_um": 0.05, "center": (0.0,)},
    ],
)
def test_spiral_rejects_bad_args(kwargs):
    with pytest.raises(ValueError):
        spiral_positions(**kwargs)


@pytest.fixture
def sim_devices():
    from ophyd import Component as Cpt
    from ophyd import Device
    from ophyd.sim import SynAxis, det

    class SimStage(Device):
        x = Cpt(SynAxis)
        y = Cpt(SynAxis)

    return det, SimStage(name="stage")


@pytest.mark.parametrize(
    "kwargs",
    [{"num": 0}, {"num": -1}, {"step": 0.0}, {"step": -0.05}, {"center": (1.0, 2.0, 3.0)}],
)
def test_ptycho_scan_validates_before_any_msg(sim_devices, kwargs):
    det, stage = sim_devices
    with pytest.raises(ValueError):
        ptycho_scan(det, stage, **kwargs)  # raises at call time, no iteration needed


def test_ptycho_scan_checks_limits(sim_devices):
    det, stage = sim_devices
    stage.x.limits = (-1.0, 1.0)  # SynAxis has none; give x some
    ptycho_scan(det, stage, num=50, step=0.05)  # fits: radius ~0.19 um
    with pytest.raises(ValueError, match="limits"):
        ptycho_scan(det, stage, num=50, step=0.05, center=(0.95, 0.0))
    with pytest.raises(ValueError, match="limits"):
        ptycho_scan(det, stage, num=2000, step=0.1)


def test_ptycho_scan_messages(sim_devices):
    det, stage = sim_devices
    msgs = list(ptycho_scan(det, stage, num=5, step=0.1, center=(0.5, 0.0), md={"user": "t"}))
    commands = [m.command for m in msgs]
    assert commands[0] == "stage" and commands[-1] == "unstage"
    assert {m.obj for m in msgs if m.command == "stage"} == {det, stage}
    open_run = next(m for m in msgs if m.command == "open_run")
    md = open_run.kwargs
    assert md["technique"] == "ptychography"
    assert md["plan_name"] == "ptycho_scan"
    assert md["num_points"] == 5 and md["step_um"] == 0.1 and md["user"] == "t"
    assert md["detectors"] == ["det"] and md["motors"] == ["stage_x", "stage_y"]
    assert md["hints"]["dimensions"] == [(["stage_x"], "primary"), (["stage_y"], "primary")]
    assert len([m for m in msgs if m.command == "trigger" and m.obj is det]) == 5
    assert commands.count("save") == 5
    assert commands.count("close_run") == 1
    sets = [(m.obj.name, m.args[0]) for m in msgs if m.command == "set"]
    planned = spiral_positions(5, 0.1, center=(0.5, 0.0))
    np.testing.assert_allclose([v for n, v in sets if n == "stage_x"], planned[:, 0])
    np.testing.assert_allclose([v for n, v in sets if n == "stage_y"], planned[:, 1])


def test_hedm_rotation_scan_messages_and_validation(sim_devices):
    from ophyd.sim import SynAxis

    det, _ = sim_devices
    rot = SynAxis(name="rot")
    msgs = list(hedm_rotation_scan(det, rot, 10.0, 12.0, 5, md={"sample": "Ni"}))
    md = next(m for m in msgs if m.command == "open_run").kwargs
    assert md["technique"] == "hedm" and md["plan_name"] == "hedm_rotation_scan"
    assert md["motors"] == ["rot"] and md["omega_step_deg"] == 0.5 and md["sample"] == "Ni"
    assert md["hints"]["dimensions"] == [(["rot"], "primary")]
    np.testing.assert_allclose(
        [m.args[0] for m in msgs if m.command == "set"], [10.0, 10.5, 11.0, 11.5, 12.0]
    )
    assert len([m for m in msgs if m.command == "trigger" and m.obj is det]) == 5
    for bad in ({"num": 0}, {"start": float("nan")}, {"stop": "x"}):
        args = {"start": 0.0, "stop": 1.0, "num": 3} | bad
        with pytest.raises(ValueError):
            hedm_rotation_scan(det, rot, **args)
    rot.limits = (-360.0, 360.0)
    with pytest.raises(ValueError, match="limits"):
        hedm_rotation_scan(det, rot, 300.0, 400.0, 11)


def test_scan_writer_with_sim_devices(RE, tmp_path):
    """ScanWriter with ophyd.sim hardware: a 2-D array detector and two SynAxis motors."""
    det, stage = kit_sim_devices((8, 6))
    writer = ScanWriter(tmp_path)
    RE.subscribe(writer)
    RE(ptycho_scan(det, stage, num=7, step=0.1))
    RE.md["technique"] = "other"
    from bluesky.plans import count

    RE(count([det], num=2))  # ignored: not ptychography
    assert len(writer.paths) == 1
    scan = read_scan(writer.last_path)
    assert scan["frames"].shape == (7, 8, 6) and scan["frames"].dtype == np.uint16
    np.testing.assert_allclose(scan["positions_um"], spiral_positions(7, 0.1), atol=1e-9)
    np.testing.assert_array_equal(scan["unique_id"], np.arange(1, 8))  # seq_num fallback
    assert scan["exit_status"] == "success" and scan["num_events"] == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    RE(hedm_rotation_scan(det, stage.x, 1.0, 2.0, 3))  # any motor can be the rotation
    hedm = read_scan(writer.last_path)
    assert hedm["technique"] == "hedm" and hedm["frames"].shape == (3, 8, 6)
    np.testing.assert_allclose(hedm["omega_deg"], [1.0, 1.5, 2.0])
    assert "positions_um" not in hedm


def test_read_scan_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("frames", data=np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="missing"):
        read_scan(bad)
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(ValueError):
        read_scan(text)
