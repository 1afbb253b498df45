"""The simulated beamline IOC: sample stage motors and a ptychography detector.

Channel Access (caproto) serves the controls; the frames go out over pvAccess (p4p) as
NTNDArray on ``$(P)det:Pva1:Image``, the way areaDetector's NDPluginPva publishes them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time


import numpy as np
from caproto import ChannelType
from caproto.server import PVGroup, SubGroup, pvproperty, run
from p4p.server import Server
from p4p.server.thread import SharedPV

from edgeloop import ntnd
from edgeloop.config import BEAMLINE_CA_PORT, Config
from edgeloop.ioc.physics import PtychoSimulator

log = logging.getLogger(__name__)

MODES = ["ptycho", "hedm"]


class SimMotor(PVGroup):
    """A motor-record-like axis (``record='motor'``) that ophyd's ``EpicsMotor`` can drive.

    Moves are event driven: DMOV drops to 0, RBV ramps at VELO in 5 ms ticks, DMOV returns
    to 1.  The user limits are also the control limits of ``.VAL``, so ophyd refuses an
    out-of-range move before it is sent and the server refuses a put that gets through.
    """

    motor = pvproperty(value=0.0, name="", record="motor", precision=4,
                       doc="sample stage axis, micrometres")

    def __init__(self, *args, limit_um: float = 1.0, velocity: float = 200.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.limit_um = limit_um
        self.velocity = velocity
        self._targets: asyncio.Queue | None = None

    @property
    def position(self) -> float:
        return float(self.motor.field_inst.user_readback_value.value)

    @motor.startup
    async def motor(self, instance, async_lib):
        fields = instance.field_inst
        self._targets = asyncio.Queue()
        await fields.velocity.write(self.velocity)
        await fields.user_low_limit.write(-self.limit_um)
        await fields.user_high_limit.write(self.limit_um)
        await fields.engineering_units.write("um")
        await instance.write_metadata(lower_ctrl_limit=-self.limit_um,
                                      upper_ctrl_limit=self.limit_um)
        await fields.done_moving_to_value.write(1)
        tick = 0.005
        while True:
            target = await self._targets.get()
            while not self._targets.empty():  # only the newest target matters
                target = self._targets.get_nowait()
            await fields.done_moving_to_value.write(0)
            await fields.motor_is_moving.write(1)
            start = fields.user_readback_value.value
            steps = int(abs(target - start) / max(fields.velocity.value, 1e-9) / tick)
            for i in range(1, steps):
                if fields.stop.value:
                    target = fields.user_readback_value.value
                    await fields.stop.write(0)
                    break
                await fields.user_readback_value.write(start + (target - start) * i / steps)
                await asyncio.sleep(tick)
            await fields.user_readback_value.write(target)
            await fields.dial_readback_value.write(target)
            await fields.motor_is_moving.write(0)
            await fields.done_moving_to_value.write(1)

    @motor.putter
    async def motor(self, instance, value):
        self._targets.put_nowait(float(value))
        return value


class Detector(PVGroup):
    """areaDetector-like camera: Acquire takes NumImages frames at the stage position.

    Each frame is the far-field diffraction pattern of the simulated sample (probe x object
    patch, FFT, intensity, Poisson noise), posted over PVA with uniqueId = ArrayCounter and
    NDAttributes SampleX/SampleY (um).  The put to Acquire completes when the frames are out.
    """

    acquire = pvproperty(value=0, name="Acquire", dtype=ChannelType.ENUM,
                         enum_strings=["Done", "Acquire"], doc="write 1 to take NumImages")
    acquire_rbv = pvproperty(value=0, name="Acquire_RBV", dtype=ChannelType.ENUM,
                             enum_strings=["Done", "Acquiring"], read_only=True)
    acquire_time = pvproperty(value=0.0, name="AcquireTime", precision=4,
                              doc="seconds per frame (exposure)")
    num_images = pvproperty(value=1, name="NumImages", doc="frames per Acquire")
    array_counter = pvproperty(value=0, name="ArrayCounter",
                               doc="next frame's uniqueId - 1; write 0 to restart a scan")
    array_counter_rbv = pvproperty(value=0, name="ArrayCounter_RBV", read_only=True)
    mode = pvproperty(value=0, name="Mode", dtype=ChannelType.ENUM, enum_strings=MODES,
                      doc="technique simulated")
    array_size_x = pvproperty(value=0, name="ArraySizeX_RBV", read_only=True)
    array_size_y = pvproperty(value=0, name="ArraySizeY_RBV", read_only=True)
    status_message = pvproperty(value="Idle", name="StatusMessage_RBV", dtype=ChannelType.CHAR,
                                max_length=256, report_as_string=True, read_only=True)

    def __init__(self, *args, sim: PtychoSimulator, image_pv: SharedPV, stage, **kwargs):
        super().__init__(*args, **kwargs)
        self.sim = sim
        self.image_pv = image_pv
        self.stage = stage
        self._stop = False

    @acquire.putter
    async def acquire(self, instance, value):
        if value in (0, "Done"):
            self._stop = True
            return 0
        if self.acquire_rbv.value in (1, "Acquiring"):
            raise RuntimeError("acquisition already running")
        self._stop = False
        await self.acquire_rbv.write(1)
        try:
            for _ in range(max(int(self.num_images.value), 1)):
                if self._stop:
                    break
                await self._one_frame()
        except Exception as exc:
            await self.status_message.write(f"acquisition failed: {exc}")
            raise
        finally:
            await self.acquire_rbv.write(0)
        return 0

    async def _one_frame(self):
        t0 = time.monotonic()
        x, y = self.stage.x.position, self.stage.y.position
        frame = await asyncio.to_thread(self.sim.frame, x, y)
        uid = int(self.array_counter.value) + 1
        self.image_pv.post(ntnd.build(frame, uid, {"SampleX": x, "SampleY": y}))
        await self.array_counter.write(uid)
        await self.array_counter_rbv.write(uid)
        await self.status_message.write(f"frame {uid} at ({x:.4f}, {y:.4f}) um")
        rest = float(self.acquire_time.value) - (time.monotonic() - t0)
        if rest > 0:
            await asyncio.sleep(rest)

    @array_counter.putter
    async def array_counter(self, instance, value):
        if value < 0:
            raise ValueError("ArrayCounter must be >= 0")
        await self.array_counter_rbv.write(int(value))
        return int(value)

    @num_images.putter
    async def num_images(self, instance, value):
        if value < 1:
            raise ValueError("NumImages must be >= 1")
        return value

    @acquire_time.putter
    async def acquire_time(self, instance, value):
        if not 0 <= value <= 60:
            raise ValueError("AcquireTime must be within 0..60 s")
        return value

    @mode.putter
    async def mode(self, instance, value):
        if value not in (0, "ptycho"):
            raise ValueError(f"mode {value!r} is not available; this build simulates 'ptycho'")
        return value

    @mode.startup
    async def mode(self, instance, async_lib):
        n = self.sim.cfg.frame_size
        await self.array_size_x.write(n)
        await self.array_size_y.write(n)


class Beamline(PVGroup):
    """Simulated ptychography beamline: $(P)SampleX, $(P)SampleY (EpicsMotor-compatible,
    micrometres), $(P)det:cam1:* (Acquire, AcquireTime, NumImages, ArrayCounter_RBV, Mode),
    and frames as NTNDArray on $(P)det:Pva1:Image (pvAccess)."""

    x = SubGroup(SimMotor, prefix="SampleX")
    y = SubGroup(SimMotor, prefix="SampleY")

    def __init__(self, prefix: str, cfg: Config, image_pv: SharedPV, **kwargs):
        super().__init__(prefix, **kwargs)
        self.sim = PtychoSimulator(cfg.sim)
        limit = round(self.sim.max_travel_um, 3)
        for axis in (self.x, self.y):
            axis.limit_um = limit
        self.cam = Detector(f"{prefix}det:cam1:", sim=self.sim, image_pv=image_pv, stage=self,
                            parent=self)
        self.pvdb.update(self.cam.pvdb)


def serve(cfg: Config, interfaces: list[str] | None = None,
          ca_port: int = BEAMLINE_CA_PORT) -> None:
    """Run the simulated beamline until interrupted (CA via caproto, PVA via p4p)."""
    os.environ["EPICS_CA_SERVER_PORT"] = str(ca_port)
    image_name = f"{cfg.prefix}det:Pva1:Image"
    # a blank uniqueId-0 placeholder until the first frame, as NDPluginPva has a value
    # before its first array; consumers skip uniqueId 0
    n = cfg.sim.frame_size
    image_pv = SharedPV(initial=ntnd.build(np.zeros((n, n), np.int32), 0))
    beamline = Beamline(cfg.prefix, cfg, image_pv)
    with Server(providers=[{image_name: image_pv}]):
        log.info("simulated beamline %s up: %d CA PVs, PVA %s", cfg.prefix,
                 len(beamline.pvdb), image_name)
        run(beamline.pvdb, interfaces=interfaces or ["127.0.0.1"], log_pv_names=False)
