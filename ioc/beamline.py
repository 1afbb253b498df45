"""The simulated beamline IOC: sample stage motors (x, y, rotation) and a detector with two
modes, ptychography and HEDM.

Channel Access (caproto) serves the controls; the frames go out over pvAccess (p4p) as
NTNDArray on ``$(P)det:Pva1:Image``, the way areaDetector's NDPluginPva publishes them, and
into HDF5 files through the NDFileHDF5-like plugin ``$(P)det:HDF1:`` (``hdf_plugin``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

import numpy as np
from caproto import ChannelType
from caproto.asyncio.server import start_server
from caproto.server import PVGroup, SubGroup, pvproperty
from p4p.server import Server
from p4p.server.thread import SharedPV

from edgeloop import ntnd
from edgeloop.config import BEAMLINE_CA_PORT, MODES, Config, PositionsConfig, check_mode
from edgeloop.ioc.adcore_db import PLUGINS
from edgeloop.ioc.adcore_served import missing_records
from edgeloop.ioc.areadetector import (
    DISABLE_ENABLE,
    IMAGE_MODES,
    TRIGGER_MODES,
    CamRecords,
    NDArray,
    enum_index,
    enum_pair,
    enum_readback,
    text,
)
from edgeloop.ioc.hdf_plugin import NDFileHDF5
from edgeloop.ioc.hedm_sim import HedmSimulator
from edgeloop.ioc.physics import PtychoSimulator
from edgeloop.ioc.trajectory import ProfileMove, Pulse

log = logging.getLogger(__name__)


class SimMotor(PVGroup):
    """A motor-record-like axis (``record='motor'``) that ophyd's ``EpicsMotor`` can drive.

    Moves are event driven: DMOV drops to 0, RBV ramps at VELO in 5 ms ticks, DMOV returns
    to 1.  The user limits are also the control limits of ``.VAL``, so ophyd refuses an
    out-of-range move before it is sent and the server refuses a put that gets through.
    """

    motor = pvproperty(value=0.0, name="", record="motor", precision=4, doc="sample stage axis")

    def __init__(
        self, *args, limit: float = 1.0, velocity: float = 200.0, units: str = "um", **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.limit = limit
        self.velocity = velocity
        self.units = units
        self._targets: asyncio.Queue | None = None

    @property
    def position(self) -> float:
        return float(self.motor.field_inst.user_readback_value.value)

    @motor.startup
    async def motor(self, instance, async_lib):
        fields = instance.field_inst
        self._targets = asyncio.Queue()
        await fields.velocity.write(self.velocity)
        await fields.user_low_limit.write(-self.limit)
        await fields.user_high_limit.write(self.limit)
        await fields.engineering_units.write(self.units)
        await instance.write_metadata(
            lower_ctrl_limit=-self.limit, upper_ctrl_limit=self.limit, units=self.units
        )
        # readbacks carry the axis's units and precision too: positions of a few 0.01 um
        # would show as 0 in a client that reads the RBV's precision (ophyd, a live table)
        for readback in (fields.user_readback_value, fields.dial_readback_value):
            await readback.write_metadata(
                precision=instance.precision,
                units=self.units,
                lower_disp_limit=-self.limit,
                upper_disp_limit=self.limit,
            )
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

    async def follow_start(self, position: float) -> None:
        """Move to the first point of a profile (at VELO) and wait until there."""
        fields = self.motor.field_inst
        if abs(self.position - position) > 1e-9:
            await self.motor.write(position)
        while not (fields.done_moving_to_value.value and abs(self.position - position) < 1e-9):
            await asyncio.sleep(0.005)
        await fields.done_moving_to_value.write(0)
        await fields.motor_is_moving.write(1)

    async def follow(self, position: float) -> None:
        """Be at ``position`` now: a profile move drives the axis, not the record's VAL."""
        fields = self.motor.field_inst
        await fields.user_readback_value.write(position)
        await fields.dial_readback_value.write(position)

    async def follow_end(self) -> None:
        """A profile ended: VAL takes the position reached, DMOV returns to 1."""
        await self.motor.write(self.position)


async def _choose_compressor(pair, instance, value):
    codec = pair.parent
    name = Codec.CHOICES[enum_index(value, Codec.CHOICES)]
    simulated = name in Codec.COMPRESSORS.values()
    await codec.status.write("Success" if simulated else "Error")
    await codec.error.write("" if simulated else f"{name} is not simulated: frames go raw")
    await pair.readback.write(value)


class Codec(PVGroup):
    """NDPluginCodec-like compression of the frames on ``Pva1:Image``: with callbacks
    enabled and a compressor chosen, each frame goes out compressed as NDPluginCodec sends it
    (``edgeloop.codecs``).  JPEG and LZ4HDF5 are ADCore choices the simulation does not make:
    chosen, they are reported in CodecStatus/CodecError and frames go out uncompressed."""

    # codec name -> Compressor choice (areaDetector's spelling); None: not simulated
    COMPRESSORS = {"": "None", "zlib": "Zlib", "blosc": "Blosc", "lz4": "LZ4", "bslz4": "BSLZ4"}
    CHOICES = ["None", "JPEG", "Zlib", "Blosc", "LZ4", "LZ4HDF5", "BSLZ4"]  # NDCodec.template

    enable = enum_pair(
        DISABLE_ENABLE,
        name="EnableCallbacks",
        doc="compress the frames (Enable) or pass them through (Disable)",
    )
    compressor = enum_pair(
        CHOICES, name="Compressor", put=_choose_compressor, doc="codec applied to each frame"
    )
    comp_factor = pvproperty(
        value=1.0,
        name="CompFactor_RBV",
        precision=2,
        read_only=True,
        doc="uncompressed / compressed size of the last frame",
    )
    status = enum_readback(["Success", "Warning", "Error"], "CodecStatus")
    error = text("CodecError", read_only=True)

    @property
    def codec(self) -> str:
        """The codec name frames go out with ("" when not compressing)."""
        if enum_index(self.enable.setpoint.value, DISABLE_ENABLE) != 1:
            return ""
        choice = self.CHOICES[enum_index(self.compressor.setpoint.value, self.CHOICES)]
        return {v: k for k, v in self.COMPRESSORS.items()}.get(choice, "")


class Detector(CamRecords):
    """areaDetector-like camera: Acquire takes one frame (ImageMode Single), NumImages
    (Multiple, the default) or frames until Acquire is set to 0 (Continuous).  TriggerMode
    Internal: one every max(AcquireTime, AcquirePeriod) seconds at the stage position;
    External: one per trigger of the trajectory controller (``Prof1:``), at the positions
    and time the trigger latched.

    Mode ``ptycho``: each frame is the far-field diffraction pattern of the simulated sample
    (probe x object patch, FFT, intensity, Poisson noise) at (SampleX, SampleY).  Mode
    ``hedm``: each frame is a detector image of Bragg peaks at the rotation angle SampleRot.
    With ArrayCallbacks enabled, frames go out over PVA and to the file plugin (``hdf``)
    with uniqueId = ArrayCounter and NDAttributes Mode plus SampleX/SampleY (um) or SampleRot
    (deg), named as the configuration's ``[positions]`` says.  The put to Acquire completes
    when the frames are out (and written).  Mode cannot change while acquiring.
    """

    acquire = pvproperty(
        value=0,
        name="Acquire",
        dtype=ChannelType.ENUM,
        enum_strings=["Done", "Acquire"],
        doc="write 1 to take NumImages",
    )
    acquire_rbv = pvproperty(
        value=0,
        name="Acquire_RBV",
        dtype=ChannelType.ENUM,
        enum_strings=["Done", "Acquiring"],
        read_only=True,
    )
    acquire_time = pvproperty(
        value=0.0,
        name="AcquireTime",
        precision=4,
        units="s",
        lower_ctrl_limit=0.0,
        upper_ctrl_limit=60.0,
        doc="seconds per frame (exposure)",
    )
    num_images = pvproperty(value=1, name="NumImages", doc="frames per Acquire")
    array_counter = pvproperty(
        value=0, name="ArrayCounter", doc="next frame's uniqueId - 1; write 0 to restart a scan"
    )
    array_counter_rbv = pvproperty(value=0, name="ArrayCounter_RBV", read_only=True)
    mode = pvproperty(
        value=0, name="Mode", dtype=ChannelType.ENUM, enum_strings=MODES, doc="technique simulated"
    )
    array_size_x = pvproperty(value=0, name="ArraySizeX_RBV", read_only=True, units="pixels")
    array_size_y = pvproperty(value=0, name="ArraySizeY_RBV", read_only=True, units="pixels")
    status_message = text("StatusMessage_RBV", "Idle", read_only=True)

    def __init__(
        self,
        *args,
        sims: dict,
        initial_mode: str,
        image_pv: SharedPV,
        stage,
        codec,
        hdf: NDFileHDF5 | None = None,
        positions: PositionsConfig | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.positions = positions or PositionsConfig()  # the NDAttributes' names
        self.codec = codec
        self.hdf = hdf
        self.sims = sims
        self.active_mode = initial_mode
        self.image_pv = image_pv
        self.stage = stage
        self._stop = False
        self._pulses: asyncio.Queue | None = None  # trigger inputs while acquiring External

    @acquire.putter
    async def acquire(self, instance, value):
        if value in (0, "Done"):
            self._stop = True
            return 0
        if self.acquire_rbv.value in (1, "Acquiring"):
            raise RuntimeError("acquisition already running")
        self._stop = False
        image_mode = IMAGE_MODES[enum_index(self.image_mode.setpoint.value, IMAGE_MODES)]
        frames = {"Single": 1, "Multiple": max(int(self.num_images.value), 1)}.get(image_mode)
        external = enum_index(self.trigger_mode.setpoint.value, TRIGGER_MODES) == 1
        self._pulses = asyncio.Queue() if external else None
        await self.num_images_counter.write(0)
        await self.acquire_rbv.write(1)
        await self.detector_state.write("Waiting" if external else "Acquire")
        state = "Idle"
        try:
            taken = 0
            while (frames is None or taken < frames) and not self._stop:  # None: Continuous
                pulse = None
                if external:
                    pulse = await self._next_pulse()
                    if pulse is None:
                        break
                await self._one_frame(pulse)
                taken += 1
                await self.num_images_counter.write(taken)
        except Exception as exc:
            state = "Error"
            await self.status_message.write(f"acquisition failed: {exc}")
            raise
        finally:
            self._pulses = None
            await self.detector_state.write(state)
            await self.acquire_rbv.write(0)
        return 0

    def pulse(self, pulse: Pulse) -> None:
        """A trigger from the trajectory controller; ignored unless acquiring in External
        trigger mode, as a camera ignores trigger inputs then."""
        if self._pulses is not None:
            self._pulses.put_nowait(pulse)

    async def _next_pulse(self) -> Pulse | None:
        """The next trigger, or None once Acquire is set to 0."""
        while not self._stop:
            try:
                return await asyncio.wait_for(self._pulses.get(), 0.1)
            except asyncio.TimeoutError:
                continue
        return None

    async def _one_frame(self, pulse: Pulse | None = None):
        """One frame at the stage's position now, or at the position and time a trigger
        pulse latched (TriggerMode External)."""
        t0 = time.monotonic()
        uid = int(self.array_counter.value) + 1
        stamp = pulse.time if pulse else time.time()
        if self.active_mode == "hedm":
            omega = pulse.positions.get("rot") if pulse else None
            omega = self.stage.rot.position if omega is None else omega
            frame, _ = await asyncio.to_thread(self.sims["hedm"].frame, omega)
            attrs = {"Mode": "hedm", self.positions.rotation: omega}
            where = f"omega {omega:.4f} deg"
        else:
            at = pulse.positions if pulse else {}
            x = at.get("x", self.stage.x.position)
            y = at.get("y", self.stage.y.position)
            frame = await asyncio.to_thread(self.sims["ptycho"].frame, x, y)
            attrs = {"Mode": "ptycho", self.positions.x: x, self.positions.y: y}
            where = f"({x:.4f}, {y:.4f}) um"
        array = NDArray(frame, uid, stamp, {"ColorMode": 0, **attrs})
        await self.array_info(array)
        if enum_index(self.array_callbacks.setpoint.value, DISABLE_ENABLE):
            value = ntnd.build(frame, uid, array.attributes, array.timestamp, self.codec.codec)
            self.image_pv.post(value)
            await self.codec.comp_factor.write(value["uncompressedSize"] / value["compressedSize"])
            if self.hdf is not None:
                await self.hdf.process(array)
        await self.array_counter.write(uid)
        await self.array_counter_rbv.write(uid)
        await self.status_message.write(f"frame {uid} at {where}")
        if pulse is not None:  # the trigger sets the pace
            return
        period = max(float(self.acquire_time.value), float(self.acquire_period.setpoint.value))
        rest = period - (time.monotonic() - t0)
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
        await self.num_images_rbv.write(value)
        return value

    @acquire_time.putter
    async def acquire_time(self, instance, value):
        if not 0 <= value <= 60:
            raise ValueError("AcquireTime must be within 0..60 s")
        await self.acquire_time_rbv.write(value)
        return value

    @mode.putter
    async def mode(self, instance, value):
        name = MODES[value] if isinstance(value, int) and 0 <= value < len(MODES) else value
        check_mode(name)
        if self.acquire_rbv.value in (1, "Acquiring"):
            raise RuntimeError("cannot change Mode while acquiring")
        self.active_mode = name
        await self._frame_size()
        log.info("detector mode %s", name)
        return name

    @mode.startup
    async def mode(self, instance, async_lib):
        await instance.write(self.active_mode)

    async def _frame_size(self) -> None:
        n = self.sims[self.active_mode].cfg.frame_size
        await self.array_size_x.write(n)
        await self.array_size_y.write(n)


class Beamline(PVGroup):
    """Simulated beamline: $(P)SampleX, $(P)SampleY (micrometres) and $(P)SampleRot (degrees,
    +-360), all EpicsMotor-compatible, with their trajectory controller $(P)Prof1:*
    (profile moves for fly scans); $(P)det:cam1:* (areaDetector camera records: Acquire,
    ImageMode, AcquireTime, NumImages, ArrayCounter_RBV, ..., plus Mode ptycho/hedm),
    $(P)det:HDF1:* (NDFileHDF5-like file plugin), $(P)det:Codec1:* (EnableCallbacks,
    Compressor, CompFactor_RBV), and frames as NTNDArray on $(P)det:Pva1:Image."""

    x = SubGroup(SimMotor, prefix="SampleX")
    y = SubGroup(SimMotor, prefix="SampleY")
    rot = SubGroup(SimMotor, prefix="SampleRot")

    def __init__(self, prefix: str, cfg: Config, image_pv: SharedPV, **kwargs):
        super().__init__(prefix, **kwargs)
        sims = {"ptycho": PtychoSimulator(cfg.sim), "hedm": HedmSimulator(cfg.hedm)}
        limit = round(sims["ptycho"].max_travel_um, 3)
        for axis in (self.x, self.y):
            axis.limit = limit
        self.rot.limit, self.rot.velocity, self.rot.units = 360.0, 180.0, "deg"
        self.codec = Codec(f"{prefix}det:Codec1:", parent=self)
        self.hdf = NDFileHDF5(f"{prefix}det:HDF1:", parent=self)
        self.hdf.root = cfg.data_path  # its files go nowhere else
        self.cam = Detector(
            f"{prefix}det:cam1:",
            sims=sims,
            initial_mode=cfg.mode,
            image_pv=image_pv,
            stage=self,
            codec=self.codec,
            hdf=self.hdf,
            positions=cfg.positions,
            parent=self,
        )
        self.profile = ProfileMove(
            f"{prefix}Prof1:", stage=self, trigger=self.cam.pulse, parent=self
        )
        for group in (self.cam, self.codec, self.hdf, self.profile):
            self.pvdb.update(group.pvdb)
        for plugin in PLUGINS:
            rest = missing_records(plugin, self.pvdb, f"{prefix}det:{plugin}")
            self.pvdb.update(rest.pvdb)


LOOPBACK_PVA_SERVER = {
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
}


def serve(
    cfg: Config,
    interfaces: list[str] | None = None,
    ca_port: int = BEAMLINE_CA_PORT,
    on_ready: Callable[[], None] | None = None,
) -> int | None:
    """Run the simulated beamline (CA via caproto, PVA via p4p) until SIGINT or SIGTERM;
    returns that signal's number.  The PVA image and then ``on_ready`` (in a thread) start
    once the CA server listens, so whatever answers last means the whole beamline does."""
    os.environ["EPICS_CA_SERVER_PORT"] = str(ca_port)
    image_name = f"{cfg.prefix}det:Pva1:Image"
    # a blank uniqueId-0 placeholder until the first frame, as NDPluginPva has a value
    # before its first array; consumers skip uniqueId 0
    n = cfg.sim.frame_size
    image_pv = SharedPV(initial=ntnd.build(np.zeros((n, n), np.int32), 0))
    beamline = Beamline(cfg.prefix, cfg, image_pv)
    # the interfaces EPICS_CAS_INTF_ADDR_LIST names, else loopback only: a simulation is
    # never reachable from the beamline's network unasked
    interfaces = interfaces or os.environ.get("EPICS_CAS_INTF_ADDR_LIST", "127.0.0.1").split()
    pva_conf = {} if "EPICS_PVAS_INTF_ADDR_LIST" in os.environ else LOOPBACK_PVA_SERVER
    with contextlib.ExitStack() as stack:

        def ca_up() -> None:
            stack.enter_context(Server(providers=[{image_name: image_pv}], conf=pva_conf))
            log.info(
                "simulated beamline %s up: %d CA PVs, PVA %s",
                cfg.prefix,
                len(beamline.pvdb),
                image_name,
            )
            if on_ready is not None:
                on_ready()

        return asyncio.run(_serve_until_signal(beamline.pvdb, interfaces, ca_up))


async def _serve_until_signal(
    pvdb: dict, interfaces: list[str], on_ready: Callable[[], None]
) -> int | None:
    """Serve until SIGINT or SIGTERM; returns the signal.  The signal only sets an event:
    raised as KeyboardInterrupt inside caproto's tasks, it can be swallowed by one of them."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: stop.done() or stop.set_result(s))

    async def listening(async_lib) -> None:  # caproto's startup hook: its sockets are bound
        await asyncio.to_thread(on_ready)

    server = asyncio.ensure_future(
        start_server(pvdb, interfaces=interfaces, startup_hook=listening)
    )
    await asyncio.wait([server, stop], return_when=asyncio.FIRST_COMPLETED)
    server.cancel()
    await asyncio.gather(server, return_exceptions=True)
    if not stop.done():  # the server ended by itself: raise why
        server.result()
        return None
    return stop.result()
