"""The simulated beamline through ophyd-async (``edgeloop[async]``): ``SimDetector`` (ophyd-async's
stock ``SimDetector`` with its HDF writer, plus the simulation's technique ``mode`` on
``cam1:Mode``), ``SampleStage`` (ophyd-async ``Motor``\\ s ``x``, ``y``, ``rot``) and
``make_async_devices``.  edgeloop's step plans take these as they take the ophyd v1 devices
of :mod:`edgeloop.bluesky_plans.devices`; ophyd-async's stock classes work unchanged too
(without ``mode`` the detector keeps the technique it has)."""

from __future__ import annotations

import logging
from pathlib import Path

from edgeloop.optional import require

require("ophyd_async", "async")

from bluesky.run_engine import call_in_bluesky_event_loop  # noqa: E402
from ophyd_async.core import (  # noqa: E402
    Device,
    StaticPathProvider,
    UUIDFilenameProvider,
)
from ophyd_async.epics import adsimdetector  # noqa: E402
from ophyd_async.epics.adcore import ADWriterFactory  # noqa: E402
from ophyd_async.epics.core import epics_signal_rw  # noqa: E402
from ophyd_async.epics.motor import Motor  # noqa: E402

log = logging.getLogger(__name__)

__all__ = ["SampleStage", "SimDetector", "make_async_devices"]


class SimDetector(adsimdetector.SimDetector):
    """ophyd-async's ``SimDetector`` on ``{prefix}cam1:`` with an HDF writer on ``HDF1:``
    (files named by ``path_provider``), plus ``mode`` (``cam1:Mode``: ``"ptycho"`` or
    ``"hedm"``), which edgeloop's plans set."""

    def __init__(self, prefix: str, path_provider, name: str = ""):
        self.mode = epics_signal_rw(str, f"{prefix}cam1:Mode")
        super().__init__(prefix, ADWriterFactory.hdf(path_provider), name=name)


class SampleStage(Device):
    """``x`` (``$(P)SampleX``), ``y`` (``$(P)SampleY``), micrometres, and ``rot``
    (``$(P)SampleRot``), degrees, as ophyd-async motors."""

    def __init__(self, prefix: str, name: str = ""):
        self.x = Motor(f"{prefix}SampleX")
        self.y = Motor(f"{prefix}SampleY")
        self.rot = Motor(f"{prefix}SampleRot")
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
