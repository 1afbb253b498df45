"""Bluesky plans: a Fermat-spiral step scan of the sample stage (ptychography) and a
rotation step scan (HEDM)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.run_engine import call_in_bluesky_event_loop, in_bluesky_event_loop
from bluesky.utils import MsgGenerator

log = logging.getLogger(__name__)

__all__ = ["hedm_rotation_scan", "ptycho_scan", "spiral_positions"]

GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))
SPIRAL_RADIUS_FACTOR = 0.55  # r = 0.55 * step * sqrt(n): nearest neighbours ~ step apart


def spiral_positions(num: int, step_um: float, center: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    """Points of a Fermat spiral with roughly uniform density.

    Parameters
    ----------
    num : int
        Number of points (>= 1).
    step_um : float
        Target nearest-neighbour spacing, micrometres (> 0).
    center : sequence of 2 floats
        Spiral centre (x, y), micrometres.

    Returns
    -------
    numpy.ndarray
        Shape ``(num, 2)``, columns (x, y) in micrometres; point ``n`` lies at radius
        ``0.55 * step_um * sqrt(n)`` and angle ``n * pi * (3 - sqrt(5))``.

    Raises
    ------
    ValueError
        If ``num < 1``, ``step_um <= 0`` or ``center`` is not two finite numbers.
    """
    num = _check_num(num)
    step_um = _check_step(step_um)
    cx, cy = _check_center(center)
    n = np.arange(num, dtype=float)
    r = SPIRAL_RADIUS_FACTOR * step_um * np.sqrt(n)
    theta = n * GOLDEN_ANGLE
    return np.column_stack([cx + r * np.cos(theta), cy + r * np.sin(theta)])


def _check_num(num) -> int:
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num must be an integer >= 1, got {num!r}")
    return int(num)


def _check_step(step) -> float:
    try:
        step = float(step)
    except (TypeError, ValueError):
        raise ValueError(f"step must be a number > 0, got {step!r}") from None
    if not math.isfinite(step) or step <= 0:
        raise ValueError(f"step must be a finite number > 0 um, got {step!r}")
    return step


def _check_center(center) -> tuple[float, float]:
    try:
        cx, cy = (float(c) for c in center)
    except (TypeError, ValueError):
        raise ValueError(f"center must be two numbers (x, y), got {center!r}") from None
    if not (math.isfinite(cx) and math.isfinite(cy)):
        raise ValueError(f"center must be finite, got {center!r}")
    return cx, cy


def _limits(motor) -> tuple[float, float] | None:
    """A motor's (low, high) user limits, or None when unknown or unset (low == high): an
    ophyd v1 motor's ``limits``, an ophyd-async motor's limit signals (read in the bluesky
    event loop, unless this plan is built inside it, where the motor checks them itself)."""
    try:
        if hasattr(getattr(motor, "low_limit_travel", None), "get_value"):  # ophyd-async
            if in_bluesky_event_loop():
                return None
            low, high = (
                call_in_bluesky_event_loop(signal.get_value(), timeout=10)
                for signal in (motor.low_limit_travel, motor.high_limit_travel)
            )
        else:
            low, high = motor.limits
        low, high = float(low), float(high)
    except Exception:  # no limits, not connected, no bluesky event loop, ...
        return None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        return None
    return low, high


def _check_limits(
    motor,
    values: np.ndarray,
    axis: str,
    units: str = "um",
    advice: str = "reduce num/step or move the center",
) -> None:
    limits = _limits(motor)
    if limits is None:
        return
    low, high = limits
    vmin, vmax = float(values.min()), float(values.max())
    if vmin < low or vmax > high:
        raise ValueError(
            f"{axis} positions span [{vmin:.4f}, {vmax:.4f}] {units}, outside the limits of "
            f"{getattr(motor, 'name', motor)} [{low}, {high}] {units}; {advice}"
        )


def _check_angles(rot, start, stop, num) -> np.ndarray:
    """``num`` evenly spaced angles from ``start`` to ``stop`` degrees, checked against
    ``rot``'s limits."""
    num = _check_num(num)
    try:
        start, stop = float(start), float(stop)
    except (TypeError, ValueError):
        raise ValueError(
            f"start/stop must be numbers (degrees), got {start!r}, {stop!r}"
        ) from None
    if not (math.isfinite(start) and math.isfinite(stop)):
        raise ValueError(f"start/stop must be finite, got {start!r}, {stop!r}")
    angles = np.linspace(start, stop, num)
    _check_limits(rot, angles, "rotation", "deg", "reduce the angular range")
    return angles


def _set_mode(det, mode: str) -> MsgGenerator:
    """Put a detector that has a ``mode`` signal into the plan's technique."""
    if hasattr(det, "mode"):
        yield from bps.mv(det.mode, mode)
        yield from _prime_file_plugin(det)


def _prime_file_plugin(det) -> MsgGenerator:
    """Pass one frame to an areaDetector's file plugin when the frame size changed: the
    plugin opens its file at the size of the last frame it saw, and refuses others (the
    reason for ophyd's ``HDF5Plugin.warmup``)."""
    hdf, cam = getattr(det, "hdf1", None), getattr(det, "cam", None)
    if hdf is None or cam is None or not hasattr(det, "acquire_busy"):
        return
    height = yield from bps.rd(hdf.array_size.height)
    width = yield from bps.rd(hdf.array_size.width)
    ny = yield from bps.rd(cam.array_size.array_size_y)
    nx = yield from bps.rd(cam.array_size.array_size_x)
    if (height, width) == (ny, nx):
        return
    log.info("%s: frames are now %d x %d; one frame primes the file plugin", det.name, ny, nx)
    image_mode = yield from bps.rd(cam.image_mode)
    trigger_mode = yield from bps.rd(cam.trigger_mode)
    yield from bps.mv(cam.image_mode, "Single", cam.trigger_mode, "Internal")
    yield from bps.mv(det.acquire_busy, 1)  # completes when the frame is out
    yield from bps.mv(cam.image_mode, image_mode, cam.trigger_mode, trigger_mode)


def _fields(obj) -> list[str]:
    try:
        fields = list(obj.hints["fields"])
    except Exception:
        fields = []
    return fields or [obj.name]


def ptycho_scan(
    det,
    stage,
    num: int = 963,
    step: float = 0.05,
    center: Sequence[float] = (0.0, 0.0),
    *,
    md: dict | None = None,
) -> MsgGenerator:
    """Step-scan the sample over a Fermat spiral, one detector frame per point.

    Parameters
    ----------
    det : ophyd.Device
        The detector (e.g. :class:`~edgeloop.bluesky_plans.devices.PtychoDetector`),
        triggered and read at every point.
    stage : ophyd.Device
        Sample stage with ``x`` and ``y`` movable components (micrometres).
    num : int
        Number of scan points (>= 1).
    step : float
        Nearest-neighbour spacing of the spiral, micrometres (> 0).
    center : sequence of 2 floats
        Spiral centre (x, y), micrometres.
    md : dict, optional
        Metadata merged into (and overriding) the plan's start-document metadata.

    Yields
    ------
    bluesky.utils.Msg
        The messages of one run: stage, open_run, per point (checkpoint, move both axes,
        trigger and read ``[det, stage.x, stage.y]``), close_run, unstage.

    Raises
    ------
    ValueError
        Before any message, if ``num < 1``, ``step <= 0``, ``center`` is invalid, or a
        position falls outside a motor's known limits.

    Notes
    -----
    The detector's ``mode`` (when it has one) is set to ``"ptycho"`` first.
    The start document carries ``technique='ptychography'``, ``num_points``, ``step_um``,
    ``center_um``, ``detectors``, ``motors`` and ``hints['dimensions']`` on the two motor
    readbacks; :class:`~edgeloop.bluesky_plans.callbacks.ScanWriter` keys on these.
    """
    # Validation runs here, eagerly, so bad arguments raise at call time, before any Msg.
    positions = spiral_positions(num, step, center)
    _check_limits(stage.x, positions[:, 0], "x")
    _check_limits(stage.y, positions[:, 1], "y")
    x_fields, y_fields = _fields(stage.x), _fields(stage.y)
    _md = {
        "plan_name": "ptycho_scan",
        "plan_args": {
            "det": repr(det),
            "stage": repr(stage),
            "num": int(num),
            "step": float(step),
            "center": [float(c) for c in center],
        },
        "detectors": [det.name],
        "motors": [stage.x.name, stage.y.name],
        "num_points": int(num),
        "num_intervals": int(num) - 1,
        "step_um": float(step),
        "center_um": [float(c) for c in center],
        "technique": "ptychography",
        "hints": {"dimensions": [(x_fields, "primary"), (y_fields, "primary")]},
    }
    _md.update(md or {})
    log.info("ptycho_scan: %d points, step %.4g um, center %s", num, step, tuple(center))
    return _ptycho_scan(det, stage, positions, _md)


def _ptycho_scan(det, stage, positions: np.ndarray, md: dict) -> MsgGenerator:
    @bpp.stage_decorator([det, stage])
    @bpp.run_decorator(md=md)
    def inner():
        for x, y in positions:
            yield from bps.checkpoint()
            yield from bps.mv(stage.x, float(x), stage.y, float(y))
            yield from bps.trigger_and_read([det, stage.x, stage.y])

    yield from _set_mode(det, "ptycho")
    return (yield from inner())


def hedm_rotation_scan(
    det, rot, start: float, stop: float, num: int, *, md: dict | None = None
) -> MsgGenerator:
    """Step the sample rotation from ``start`` to ``stop`` (inclusive), one HEDM detector frame
    per angle.

    Parameters
    ----------
    det : ophyd.Device
        The detector (e.g. :class:`~edgeloop.bluesky_plans.devices.PtychoDetector`); its
        ``mode`` is set to ``"hedm"`` before the run when it has one.
    rot : ophyd.Device
        Rotation motor (degrees), e.g. ``stage.rot`` on ``$(P)SampleRot``.
    start, stop : float
        First and last angle, degrees (``stop < start`` scans backwards).
    num : int
        Number of angles (>= 1); the step is ``(stop - start) / (num - 1)``.
    md : dict, optional
        Metadata merged into (and overriding) the plan's start-document metadata.

    Yields
    ------
    bluesky.utils.Msg
        Set the detector mode, stage, open_run, per angle (checkpoint, move, trigger and
        read ``[det, rot]``), close_run, unstage.

    Raises
    ------
    ValueError
        Before any message, if ``num < 1``, an angle is not finite, or an angle falls
        outside the motor's known limits.

    Notes
    -----
    The start document carries ``technique='hedm'``, ``num_points``, ``omega_start_deg``,
    ``omega_stop_deg``, ``omega_step_deg``, ``detectors``, ``motors`` and
    ``hints['dimensions']`` on the rotation readback;
    :class:`~edgeloop.bluesky_plans.callbacks.ScanWriter` stores the run with ``omega_deg``.
    """
    angles = _check_angles(rot, start, stop, num)
    start, stop, num = float(angles[0]), float(angles[-1]), len(angles)
    _md = {
        "plan_name": "hedm_rotation_scan",
        "plan_args": {
            "det": repr(det),
            "rot": repr(rot),
            "start": start,
            "stop": stop,
            "num": num,
        },
        "detectors": [det.name],
        "motors": [rot.name],
        "num_points": num,
        "num_intervals": num - 1,
        "omega_start_deg": start,
        "omega_stop_deg": stop,
        "omega_step_deg": (stop - start) / (num - 1) if num > 1 else 0.0,
        "technique": "hedm",
        "hints": {"dimensions": [(_fields(rot), "primary")]},
    }
    _md.update(md or {})
    log.info("hedm_rotation_scan: %d angles %.4g..%.4g deg", num, start, stop)
    return _rotation_scan(det, rot, angles, _md)


def _rotation_scan(det, rot, angles: np.ndarray, md: dict) -> MsgGenerator:
    @bpp.stage_decorator([det, rot])
    @bpp.run_decorator(md=md)
    def inner():
        for omega in angles:
            yield from bps.checkpoint()
            yield from bps.mv(rot, float(omega))
            yield from bps.trigger_and_read([det, rot])

    yield from _set_mode(det, "hedm")
    return (yield from inner())
