"""Fly scans with ophyd-async devices (``edgeloop[async]``): the detector is prepared for
external edge triggers (one frame per pulse of the trajectory controller), kicked off, the
profile built and executed, and the frames collected while it runs as ophyd-async collects a
``StandardDetector``: ``stream_resource`` / ``stream_datum`` documents into the ``primary``
stream (no per-frame events; the positions the camera stamped on each frame are in the file's
NDAttributes, where :class:`~edgeloop.bluesky_plans.RunIndex` and ``read_scan`` find them).

:func:`edgeloop.bluesky_plans.ptycho_fly_scan` and ``hedm_fly_scan`` come here when given an
ophyd-async detector (:class:`~edgeloop.bluesky_plans.async_devices.SimDetector`) and stage
(:class:`~edgeloop.bluesky_plans.async_devices.SampleStage`)."""

from __future__ import annotations

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from edgeloop.optional import require


def is_async(device) -> bool:
    """An ophyd-async device, not an ophyd v1 one."""
    try:
        from ophyd_async.core import Device
    except ImportError:
        return False
    return isinstance(device, Device)


def _load_profile(profile, path: dict[str, np.ndarray], rate_hz: float) -> MsgGenerator:
    n = len(next(iter(path.values())))
    settings = [profile.num_points, n, profile.fixed_time, 1.0 / rate_hz]
    for axis in ("x", "y", "rot"):
        settings += [getattr(profile, f"{axis}_use"), "Yes" if axis in path else "No"]
        if axis in path:
            settings += [getattr(profile, f"{axis}_positions"), np.asarray(path[axis], float)]
    yield from bps.mv(*settings)
    yield from bps.mv(profile.build, "Build")  # done once built
    status = yield from bps.rd(profile.build_status)
    if status != "Success":
        message = yield from bps.rd(profile.build_message)
        raise RuntimeError(f"profile build failed: {message}")


def fly_async(det, stage, path: dict, rate_hz: float, md: dict) -> MsgGenerator:
    """One run: ``det`` takes a frame per point of ``path`` (stage axis -> positions) while
    ``stage.profile`` drives the stage through it at ``rate_hz`` points per second."""
    core = require("ophyd_async.core", "async")
    n = len(next(iter(path.values())))
    info = core.TriggerInfo(
        number_of_events=n, trigger=core.DetectorTrigger.EXTERNAL_EDGE, livetime=1.0 / rate_hz
    )
    profile = stage.profile

    @bpp.stage_decorator([det])
    @bpp.run_decorator(md=md)
    def inner():
        yield from bps.prepare(det, info, wait=True)
        yield from bps.declare_stream(det, name="primary", collect=True)
        yield from _load_profile(profile, path, rate_hz)
        yield from bps.kickoff(det, wait=True)
        yield from bps.mv(profile.execute, "Execute")  # returns at once; the stage moves
        yield from bps.collect_while_completing([det], [det], flush_period=0.5)
        outcome = yield from bps.rd(profile.execute_status)
        if outcome != "Success":
            message = yield from bps.rd(profile.execute_message)
            raise RuntimeError(f"profile {outcome}: {message}")

    def stop_the_stage(trigger_mode):
        state = yield from bps.rd(profile.execute_state)
        if state != "Done":  # an interrupted fly
            yield from bps.mv(profile.abort, "Abort")
        # as the ophyd v1 flyer's unstage does: the next step scan triggers internally
        yield from bps.mv(det.trigger_mode, trigger_mode)

    before = yield from bps.rd(det.trigger_mode)
    return (yield from bpp.finalize_wrapper(inner(), stop_the_stage(before)))
