"""The simulated stage's trajectory controller, ``$(P)Prof1:``, after the EPICS motor
module's profile moves (profileMove.template): the positions of each axis along the path,
a fixed time per point, Build (check the path) and Execute (run it).

While a profile runs, the stage passes through point ``i`` at ``i * FixedTime`` seconds
after Execute and the controller sends one trigger pulse per point, carrying the positions
latched at that instant, as a position-capture system stamps them.  A camera in TriggerMode
External takes one frame per pulse at the latched positions (``Detector``).

Records: NumPoints, FixedTime, M1Positions/M2Positions/M3Positions (SampleX, SampleY,
SampleRot) with M1UseAxis..M3UseAxis, Build/BuildState/BuildStatus/BuildMessage,
Execute/ExecuteState/ExecuteStatus/ExecuteMessage, Abort, CurrentPoint_RBV.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np
from caproto import ChannelType
from caproto.server import PVGroup, pvproperty

from edgeloop.ioc.areadetector import NO_YES, enum_index

log = logging.getLogger(__name__)

MAX_POINTS = 100_000
READBACK_PERIOD_S = 0.02  # how often the axes' readbacks post while a profile runs
STATES = ["Done", "Busy"]
STATUSES = ["Undefined", "Success", "Failure", "Abort", "Timeout"]
AXES = ("x", "y", "rot")  # M1, M2, M3


@dataclass(frozen=True)
class Pulse:
    """One trigger of the trajectory: point index, POSIX time, positions latched then."""

    point: int
    time: float
    positions: dict  # axis name ("x", "y", "rot") -> position


def _enum(name: str, choices: list[str], doc: str = "", read_only: bool = False):
    return pvproperty(
        value=choices[0],
        name=name,
        dtype=ChannelType.ENUM,
        enum_strings=choices,
        read_only=read_only,
        doc=doc,
    )


def _positions(name: str, doc: str):
    # a few updates of 100,000 positions are plenty to queue per subscriber
    return pvproperty(
        value=[0.0], name=name, max_length=MAX_POINTS, max_subscription_backlog=10, doc=doc
    )


def _message(name: str):
    return pvproperty(
        value="",
        name=name,
        dtype=ChannelType.CHAR,
        max_length=256,
        report_as_string=True,
        read_only=True,
    )


class ProfileMove(PVGroup):
    """A profile-move controller for the stage's axes (``stage.x``, ``.y``, ``.rot``:
    :class:`~edgeloop.ioc.beamline.SimMotor`) that sends its pulses to ``trigger``, a
    callable taking a :class:`Pulse`."""

    num_points = pvproperty(value=0, name="NumPoints", doc="points in the profile")
    fixed_time = pvproperty(
        value=0.01, name="FixedTime", precision=5, units="s", doc="seconds per point"
    )
    m1_positions = _positions("M1Positions", "SampleX along the profile (um)")
    m2_positions = _positions("M2Positions", "SampleY along the profile (um)")
    m3_positions = _positions("M3Positions", "SampleRot along the profile (deg)")
    m1_use = _enum("M1UseAxis", NO_YES, "SampleX follows the profile")
    m2_use = _enum("M2UseAxis", NO_YES, "SampleY follows the profile")
    m3_use = _enum("M3UseAxis", NO_YES, "SampleRot follows the profile")
    build = _enum("Build", ["Done", "Build"], "check the profile")
    build_state = _enum("BuildState", STATES, read_only=True)
    build_status = _enum("BuildStatus", STATUSES, read_only=True)
    build_message = _message("BuildMessage")
    execute = _enum("Execute", ["Done", "Execute"], "run the built profile")
    execute_state = _enum(
        "ExecuteState", ["Done", "Move start", "Executing", "Flyback"], read_only=True
    )
    execute_status = _enum("ExecuteStatus", STATUSES, read_only=True)
    execute_message = _message("ExecuteMessage")
    abort = _enum("Abort", ["Done", "Abort"], "stop a running profile")
    current_point = pvproperty(value=0, name="CurrentPoint_RBV", read_only=True)

    def __init__(self, *args, stage, trigger, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = stage
        self.trigger = trigger
        self._path: dict[str, np.ndarray] | None = None  # the built profile
        self._run: asyncio.Task | None = None
        self._aborted = False

    def _used(self) -> dict[str, np.ndarray]:
        uses = (self.m1_use, self.m2_use, self.m3_use)
        arrays = (self.m1_positions, self.m2_positions, self.m3_positions)
        return {
            axis: np.asarray(positions.value, float)
            for axis, use, positions in zip(AXES, uses, arrays)
            if enum_index(use.value, NO_YES)
        }

    def _check(self) -> dict[str, np.ndarray]:
        n = int(self.num_points.value)
        if not 1 <= n <= MAX_POINTS:
            raise ValueError(f"NumPoints must be 1..{MAX_POINTS}, is {n}")
        if not float(self.fixed_time.value) > 0:
            raise ValueError("FixedTime must be > 0 s")
        used = self._used()
        if not used:
            raise ValueError("no axis in use (M1UseAxis..M3UseAxis)")
        path = {}
        for axis, values in used.items():
            if len(values) < n:
                raise ValueError(f"{axis}: {len(values)} positions for NumPoints {n}")
            values = values[:n]
            limit = getattr(self.stage, axis).limit
            if not np.isfinite(values).all() or np.abs(values).max() > limit:
                raise ValueError(f"{axis}: positions outside the limits +-{limit}")
            path[axis] = values
        return path

    @build.putter
    async def build(self, instance, value):
        if not enum_index(value, ["Done", "Build"]):
            return "Done"
        if self._run is not None and not self._run.done():
            raise RuntimeError("cannot build while a profile is executing")
        await self.build_state.write("Busy")
        try:
            self._path = self._check()
        except ValueError as exc:
            self._path = None
            await self.build_status.write("Failure")
            await self.build_message.write(str(exc)[:255])
        else:
            n = int(self.num_points.value)
            await self.build_status.write("Success")
            await self.build_message.write(f"{n} points, {sorted(self._path)}")
        await self.build_state.write("Done")
        return "Done"

    @execute.putter
    async def execute(self, instance, value):
        if not enum_index(value, ["Done", "Execute"]):
            return "Done"
        if self._path is None:
            await self.execute_status.write("Failure")
            await self.execute_message.write("profile not built (Build it first)")
            return "Done"
        if self._run is not None and not self._run.done():
            raise RuntimeError("a profile is already executing")
        self._aborted = False
        self._run = asyncio.ensure_future(self._execute(self._path))
        return "Done"  # the put completes at once; ExecuteState says when the move ends

    @abort.putter
    async def abort(self, instance, value):
        if enum_index(value, ["Done", "Abort"]) and self._run is not None:
            self._aborted = True
        return "Done"

    async def _execute(self, path: dict[str, np.ndarray]) -> None:
        n = len(next(iter(path.values())))
        dt = float(self.fixed_time.value)
        axes = {axis: getattr(self.stage, axis) for axis in path}
        await self.execute_status.write("Undefined")
        await self.execute_message.write("")
        await self.execute_state.write("Move start")
        for axis, motor in axes.items():
            await motor.follow_start(float(path[axis][0]))
        await self.execute_state.write("Executing")
        loop = asyncio.get_running_loop()
        t0 = next_post = loop.time()
        status, message = "Success", f"{n} points in "
        try:
            for i in range(n):
                if self._aborted:
                    status, message = "Abort", f"aborted at point {i} of {n} after "
                    break
                rest = t0 + i * dt - loop.time()
                if rest > 0:
                    await asyncio.sleep(rest)
                latched = {axis: float(path[axis][i]) for axis in axes}
                self.trigger(Pulse(i, time.time(), latched))
                # readbacks post at a motor record's polling rate, not once per point
                if loop.time() >= next_post or i == n - 1:
                    next_post = loop.time() + READBACK_PERIOD_S
                    for axis, motor in axes.items():
                        await motor.follow(latched[axis])
                    await self.current_point.write(i + 1)
        except Exception as exc:  # a caproto write failing: the profile stops, the IOC stays
            log.exception("profile failed")
            status, message = "Failure", f"failed ({exc}) after "
        await self.current_point.write(i + 1)
        for motor in axes.values():
            await motor.follow_end()
        await self.execute_message.write(f"{message}{loop.time() - t0:.3f} s"[:255])
        await self.execute_status.write(status)
        await self.execute_state.write("Done")
        log.info("profile %s: %s", status, self.execute_message.value)
