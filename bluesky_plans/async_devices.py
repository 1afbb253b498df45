"""The simulated beamline through ophyd-async (``edgeloop[async]``): ``SimDetector`` (ophyd-async's
areaDetector with ADSimDetector's logics and the HDF writer, plus the simulation's technique
``mode`` on ``cam1:Mode`` and external triggering for fly scans), ``SampleStage``
(ophyd-async ``Motor``\\ s ``x``, ``y``, ``rot`` and the trajectory controller ``profile``)
and ``make_async_devices``.  edgeloop's step plans take these as they take the ophyd v1 devices
of :mod:`edgeloop.bluesky_plans.devices`; ophyd-async's stock classes work unchanged too
(without ``mode`` the detector keeps the technique it has)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgeloop.optional import require

require("ophyd_async", "async")

from bluesky.run_engine import call_in_bluesky_event_loop  # noqa: E402
from ophyd_async.core import (  # noqa: E402
    Array1D,
    Device,
    StaticPathProvider,
    UUIDFilenameProvider,
)
from ophyd_async.epics.adcore import (  # noqa: E402
    ADAcquireLogic,
    ADBaseIO,
    ADWriterFactory,
    AreaDetector,
)
from ophyd_async.epics.adsimdetector import SimDetectorTriggerLogic  # noqa: E402
from ophyd_async.epics.core import epics_signal_r, epics_signal_rw  # noqa: E402
from ophyd_async.epics.motor import Motor  # noqa: E402

log = logging.getLogger(__name__)

__all__ = ["SampleStage", "SimDetector", "make_async_devices"]


class SimTriggerLogic(SimDetectorTriggerLogic):
    """ADSimDetector's trigger logic with external edges too: in TriggerMode External the
    simulated camera takes one frame per pulse of the trajectory controller."""

    def __init__(self, driver: ADBaseIO, trigger_mode):
        super().__init__(driver)
        self.trigger_mode = trigger_mode

    async def prepare_internal(self, num: int, livetime: float, deadtime: float):
        await self.trigger_mode.set("Internal")
        await super().prepare_internal(num, livetime, deadtime)

    async def prepare_edge(self, num: int, livetime: float):
        await self.trigger_mode.set("External")
        await super().prepare_internal(num, livetime, 0.0)


class SimDetector(AreaDetector[ADBaseIO]):
    """ophyd-async's areaDetector on ``{prefix}cam1:`` with ADSimDetector's acquire and
    trigger logics and an HDF writer on ``HDF1:`` (files named by ``path_provider``), plus
    ``mode`` (``cam1:Mode``: ``"ptycho"`` or ``"hedm"``, which edgeloop's plans set) and
    external edge triggers (``cam1:TriggerMode`` External: a frame per trajectory pulse)."""

    def __init__(self, prefix: str, path_provider, name: str = ""):
        driver = ADBaseIO(f"{prefix}cam1:")
        self.mode = epics_signal_rw(str, f"{prefix}cam1:Mode")
        self.trigger_mode = epics_signal_rw(str, f"{prefix}cam1:TriggerMode")
        super().__init__(
            driver,
            prefix,
            ADWriterFactory.hdf(path_provider),
            acquire_logic=ADAcquireLogic(driver),
            trigger_logic=SimTriggerLogic(driver, self.trigger_mode),
            name=name,
        )


class ProfileMove(Device):
    """The trajectory controller ``$(P)Prof1:`` (the motor module's profile moves): positions
    per axis (M1 SampleX, M2 SampleY, M3 SampleRot), a fixed time per point, Build, Execute
    (its put returns at once; ExecuteState says when the move has ended) and Abort."""

    def __init__(self, prefix: str, name: str = ""):
        self.num_points = epics_signal_rw(int, f"{prefix}NumPoints")
        self.fixed_time = epics_signal_rw(float, f"{prefix}FixedTime")
        for i, axis in enumerate(("x", "y", "rot"), 1):
            positions = epics_signal_rw(Array1D[np.float64], f"{prefix}M{i}Positions")
            setattr(self, f"{axis}_positions", positions)
            setattr(self, f"{axis}_use", epics_signal_rw(str, f"{prefix}M{i}UseAxis"))
        self.build = epics_signal_rw(str, f"{prefix}Build")  # "Build": done when built
        self.build_status = epics_signal_r(str, f"{prefix}BuildStatus")
        self.build_message = epics_signal_r(str, f"{prefix}BuildMessage")
        self.execute = epics_signal_rw(str, f"{prefix}Execute")
        self.execute_state = epics_signal_r(str, f"{prefix}ExecuteState")
        self.execute_status = epics_signal_r(str, f"{prefix}ExecuteStatus")
        self.execute_message = epics_signal_r(str, f"{prefix}ExecuteMessage")
        self.abort = epics_signal_rw(str, f"{prefix}Abort")
        super().__init__(name=name)


class SampleStage(Device):
    """``x`` (``$(P)SampleX``), ``y`` (``$(P)SampleY``), micrometres, and ``rot``
    (``$(P)SampleRot``), degrees, as ophyd-async motors, and their trajectory controller
    ``profile`` (``$(P)Prof1:``, fly scans)."""

    def __init__(self, prefix: str, name: str = ""):
        self.x = Motor(f"{prefix}SampleX")
        self.y = Motor(f"{prefix}SampleY")
        self.rot = Motor(f"{prefix}SampleRot")
        self.profile = ProfileMove(f"{prefix}Prof1:")
        super().__init__(name=name)


def make_async_devices(
    prefix: str = "SIM:", data_dir: str | Path = ".", timeout: float = 10.0
) -> tuple[SimDetector, SampleStage]:
    """The simulated beamline's detector (``det``, a file per run with a UUID name in
    ``data_dir``) and stage, connected in the bluesky event loop (make the RunEngine
    first)."""
    directory = Path(data_dir).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    det = SimDetector(f"{prefix}det:", StaticPathProvider(UUIDFilenameProvider(), directory))
    stage = SampleStage(prefix)
    for device, name in ((det, "det"), (stage, "stage")):
        device.set_name(name)
        call_in_bluesky_event_loop(device.connect(timeout=timeout))
    log.info("ophyd-async devices on %s connected, files to %s", prefix, directory)
    return det, stage
