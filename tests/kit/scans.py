"""Scans without hardware and what they leave: ``SIM_DEVICES`` (ophyd.sim source a script can
``exec``; ``SHAPE`` is the frame shape), ``sim_devices(shape)`` (a detector and an x/y
stage), ``check_partial`` (a partial scan file holds whole events, numbered from 1)."""

import numpy as np

from edgeloop.scanfile import read_scan

SIM_DEVICES = """
import numpy as np
from ophyd import Component as Cpt, Device
from ophyd.sim import SynAxis, SynSignal

class ImageDet(Device):
    image = Cpt(SynSignal, func=lambda: np.random.poisson(5, SHAPE).astype(np.uint16),
                kind="hinted")

    def trigger(self):
        return self.image.trigger()

class SimStage(Device):
    x = Cpt(SynAxis)
    y = Cpt(SynAxis)

det, stage = ImageDet(name="cam"), SimStage(name="stage")
"""


def sim_devices(shape=(8, 6)):
    namespace = {"SHAPE": shape}
    exec(SIM_DEVICES, namespace)
    return namespace["det"], namespace["stage"]


def check_partial(path, frames_ok, shape) -> None:
    scan = read_scan(path)
    n = scan["num_events"]
    assert not scan["complete"] and frames_ok(n), n
    assert scan["frames"].shape == (n, *shape) and scan["positions_um"].shape == (n, 2)
    assert len(scan["unique_id"]) == len(scan["timestamps"]) == n
    np.testing.assert_array_equal(scan["unique_id"], np.arange(1, n + 1))
