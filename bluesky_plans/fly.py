"""Fly scans: the stage follows its path under the trajectory controller while the detector,
in TriggerMode External, takes one frame per trigger pulse, stamped with the positions the
pulse latched.  :class:`TrajectoryFlyer` is an ophyd flyer (kickoff / complete /
describe_collect / collect / collect_asset_docs) that bluesky's ``kickoff``, ``complete``
and ``collect`` messages drive; the plans :func:`ptycho_fly_scan` and :func:`hedm_fly_scan`
emit one event per frame whose image is a datum in the detector's HDF5 file and whose
positions and uniqueId are those the file holds for that frame.  Given ophyd-async devices,
the plans fly them as ophyd-async does (:mod:`edgeloop.bluesky_plans.async_fly`)."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator
from ophyd.status import Status

from edgeloop import adfile
from edgeloop.bluesky_plans.async_fly import fly_async, is_async
from edgeloop.bluesky_plans.plans import (
    _check_angles,
    _check_center,
    _check_limits,
    _check_step,
    _fields,
    _set_mode,
    spiral_positions,
)
from edgeloop.config import PositionsConfig
from edgeloop.waiting import wait_until

log = logging.getLogger(__name__)

__all__ = ["TrajectoryFlyer", "hedm_fly_scan", "ptycho_fly_scan"]

AXES = ("x", "y", "rot")  # the stage's axes a path may name
MAX_RATE_HZ = 10_000.0


def _check_rate(rate_hz) -> float:
    try:
        rate = float(rate_hz)
    except (TypeError, ValueError):
        raise ValueError(f"rate_hz must be a number > 0, got {rate_hz!r}") from None
    if not (math.isfinite(rate) and 0 < rate <= MAX_RATE_HZ):
        raise ValueError(f"rate_hz must be within (0, {MAX_RATE_HZ:g}] Hz, got {rate_hz!r}")
    return rate


class TrajectoryFlyer:
    """Fly ``stage`` through ``path`` at ``rate_hz`` points per second, one detector frame
    per point.

    Parameters
    ----------
    det : AreaDetector
        An :class:`~edgeloop.bluesky_plans.devices.AreaDetector` (camera ``cam`` with
        TriggerMode External, file plugin ``hdf1``).
    stage : SampleStage
        Its ``profile`` (a :class:`~edgeloop.bluesky_plans.devices.ProfileMove`) drives the
        axes and triggers the detector.
    path : dict
        Stage axis (``"x"``, ``"y"``, ``"rot"``) -> positions, all of one length.
    rate_hz : float
        Points (frames) per second: FixedTime and AcquirePeriod are ``1 / rate_hz``.
    name : str
        Ophyd name of the flyer.
    timeout : float
        Seconds allowed beyond the path's own duration for the frames to be written.
    positions : PositionsConfig, optional
        The NDAttributes the detector stamps the positions in (default SampleX, SampleY,
        SampleRot).

    Notes
    -----
    Staging the flyer stages the detector with NumImages 1 (so the resource says one frame
    per datum), TriggerMode External and AcquirePeriod ``1 / rate_hz``; kickoff sets
    NumImages and NumCapture to the number of points, starts the acquisition, builds and
    executes the profile.  complete finishes when the profile is done and the file plugin
    has written every frame; it fails, stopping detector and profile, when the profile fails
    or frames are missing after the timeout.
    """

    def __init__(
        self,
        det,
        stage,
        path: dict[str, np.ndarray],
        rate_hz: float,
        *,
        name: str = "flyer",
        timeout: float = 30.0,
        positions: PositionsConfig | None = None,
    ):
        lengths = {len(v) for v in path.values()}
        if len(lengths) != 1 or not path:
            raise ValueError(f"path needs positions of one length per axis, got {lengths}")
        unknown = set(path) - set(AXES)
        if unknown:
            raise ValueError(f"unknown stage axes {sorted(unknown)}; known {list(AXES)}")
        names = positions or PositionsConfig()
        self.attributes = {"x": names.x, "y": names.y, "rot": names.rotation}
        self.det, self.sample_stage, self.name, self.parent = det, stage, name, None
        self.path = {axis: np.asarray(v, float) for axis, v in path.items()}
        self.num = lengths.pop()
        self.rate_hz = _check_rate(rate_hz)
        self.timeout = timeout
        self._saved_sigs: dict | None = None
        self._file: str | None = None
        self._frames: dict | None = None
        self._ended = threading.Event()  # unstaged or stopped: waiting threads give up

    # -- staging -------------------------------------------------------------------------
    def stage(self) -> list:
        self._ended.clear()
        cam = self.det.cam
        self._saved_sigs = dict(self.det.stage_sigs)
        self.det.stage_sigs.update(
            {
                "cam.num_images": 1,
                "cam.trigger_mode": "External",
                "cam.acquire_period": 1.0 / self.rate_hz,
            }
        )
        if float(cam.acquire_time.get()) > 1.0 / self.rate_hz:
            self.det.stage_sigs["cam.acquire_time"] = 1.0 / self.rate_hz
        try:
            self.det.stage()
        except Exception:
            self.det.stage_sigs = self._saved_sigs
            raise
        return [self]

    def unstage(self) -> list:
        self._ended.set()
        try:
            if self.sample_stage.profile.execute_state.get(use_monitor=False) != "Done":
                self.sample_stage.profile.abort.put(1)  # an interrupted fly: stop the stage
            self.det.unstage()
        finally:
            if self._saved_sigs is not None:
                self.det.stage_sigs = self._saved_sigs
                self._saved_sigs = None
        return [self]

    def stop(self, *, success: bool = False) -> None:
        """Stop the profile and the acquisition (a RunEngine stop or abort calls this)."""
        self._ended.set()
        self.sample_stage.profile.abort.put(1)
        self.det.cam.acquire.put(0)

    # -- flying --------------------------------------------------------------------------
    def kickoff(self) -> Status:
        status = Status(obj=self, timeout=self.timeout)
        threading.Thread(target=self._run, args=(status, self._kickoff), daemon=True).start()
        return status

    def complete(self) -> Status:
        status = Status(obj=self)
        threading.Thread(target=self._run, args=(status, self._complete), daemon=True).start()
        return status

    def _run(self, status: Status, step) -> None:
        try:
            step()
        except Exception as exc:
            if self._ended.is_set():  # the run is over already: nothing to stop
                log.info("%s: %s", self.name, exc)
                status.set_exception(exc)
                return
            log.error("%s: %s", self.name, exc)
            try:
                self.stop()
            except Exception:  # pragma: no cover - the IOC is gone
                log.debug("stopping after a failure failed", exc_info=True)
            status.set_exception(exc)
        else:
            status.set_finished()

    def _kickoff(self) -> None:
        cam, hdf, profile = self.det.cam, self.det.hdf1, self.sample_stage.profile
        hdf.num_capture.put(self.num, wait=True)
        cam.num_images.put(self.num, wait=True)
        cam.acquire.put(1)
        _wait_for(
            lambda: cam.acquire.get(use_monitor=False) == 1,
            5.0,
            "the detector to arm",
            self._ended,
        )
        for axis, (positions, use) in profile.AXES.items():
            flies = axis in self.path
            getattr(profile, use).put("Yes" if flies else "No", wait=True)
            if flies:
                getattr(profile, positions).put(self.path[axis], wait=True)
        profile.num_points.put(self.num, wait=True)
        profile.fixed_time.put(1.0 / self.rate_hz, wait=True)
        profile.build.put(1, wait=True)
        if profile.build_status.get(use_monitor=False) != "Success":
            raise RuntimeError(f"profile build failed: {profile.build_message.get()}")
        self._file = self.det.hdf1._fn  # the read path of the file staging opened
        self._frames = None
        profile.execute.put(1, wait=True)

    def _complete(self) -> None:
        cam, hdf, profile = self.det.cam, self.det.hdf1, self.sample_stage.profile
        duration = self.num / self.rate_hz
        _wait_for(
            lambda: profile.execute_state.get(use_monitor=False) == "Done",
            duration * 2 + self.timeout,
            "the profile to end",
            self._ended,
        )
        outcome = profile.execute_status.get(use_monitor=False)
        if outcome != "Success":
            raise RuntimeError(f"profile {outcome}: {profile.execute_message.get()}")
        try:
            _wait_for(
                lambda: int(hdf.num_captured.get(use_monitor=False)) >= self.num,
                self.timeout + duration,
                "the file plugin to write every frame",
                self._ended,
            )
        except TimeoutError:
            taken = cam.num_images_counter.get(use_monitor=False)
            written = hdf.num_captured.get(use_monitor=False)
            raise TimeoutError(
                f"{self.name}: {taken} of {self.num} frames taken, {written} written "
                f"({hdf.write_message.get()!r}) {self.timeout:.0f} s after the profile ended"
            ) from None
        cam.acquire.put(0)

    # -- documents -----------------------------------------------------------------------
    def _keys(self) -> dict[str, str]:
        """Stage axis -> event data key (the motor's readback name, as in step scans)."""
        return {axis: getattr(self.sample_stage, axis).user_readback.name for axis in self.path}

    @property
    def hints(self) -> dict:
        """The uniqueId is the field worth a column or a plot (the image is a datum id)."""
        return {"fields": [f"{self.det.name}_unique_id"]}

    def describe_collect(self) -> dict:
        image = f"{self.det.name}_image"
        _, ny, nx = (int(v) for v in self.det.hdf1.array_size.get())
        source = f"PV:{self.det.prefix}HDF1:"
        keys = {
            image: {
                "source": source,
                "dtype": "array",
                "shape": [1, ny, nx],
                "external": "FILESTORE:",
                **({"dtype_numpy": self.det.dtype_numpy} if self.det.dtype_numpy else {}),
            },
            f"{self.det.name}_unique_id": {"source": source, "dtype": "integer", "shape": []},
        }
        for axis, key in self._keys().items():
            keys[key] = {
                "source": f"{source}{self.attributes[axis]}",
                "dtype": "number",
                "shape": [],
            }
        return {"primary": keys}

    def read_configuration(self) -> dict:
        return self.det.read_configuration()

    def describe_configuration(self) -> dict:
        return self.det.describe_configuration()

    def collect_asset_docs(self):
        """The resource made at staging and one datum per frame written."""
        self._read_file()
        yield from self.det.collect_asset_docs()

    def collect(self):
        """One event per frame: the image as a datum in the file, the uniqueId and the
        positions the file holds for it, at the frame's time stamp."""
        frames = self._read_file()
        image = f"{self.det.name}_image"
        for i, datum in enumerate(frames["datum"]):
            t = float(frames["time"][i])
            data = {image: datum, f"{self.det.name}_unique_id": int(frames["uid"][i])}
            data.update({key: float(v[i]) for key, v in frames["positions"].items()})
            yield {
                "time": t,
                "data": data,
                "timestamps": dict.fromkeys(data, t),
                "filled": {image: False},
            }

    def _read_file(self) -> dict:
        """uniqueIds, time stamps and positions of the frames in the file (read once per
        fly, after complete), with a datum generated for each."""
        if self._frames is not None:
            return self._frames
        if self._file is None:
            raise RuntimeError(f"{self.name}: collect before kickoff")
        technique = "hedm" if "rot" in self.path else "ptychography"
        with adfile.open_file(self._file, f"{self.det.name}'s file") as f:
            # a partial collect (an aborted fly) may find the IOC writing: whole rows only
            names = [self.attributes[a] for a in (("rot",) if technique == "hedm" else ("x", "y"))]
            n = min(self.num, adfile.whole_rows(f, technique, positions=names)[0])
            frames = {
                "uid": f[adfile.UNIQUE_ID][:n],
                "time": f[adfile.TIMESTAMP][:n] + adfile.EPICS_EPOCH,
                "positions": {
                    key: f[f"{adfile.ATTRIBUTES}/{self.attributes[axis]}"][:n]
                    for axis, key in self._keys().items()
                },
            }
        image = f"{self.det.name}_image"
        frames["datum"] = [
            self.det.hdf1.generate_datum(image, float(t), {}) for t in frames["time"]
        ]
        self._frames = frames
        return frames


def _wait_for(predicate, timeout: float, what: str, ended=None, poll: float = 0.05) -> None:
    """Poll ``predicate`` until true; TimeoutError after ``timeout`` s, RuntimeError once the
    ``ended`` event is set (the fly was unstaged meanwhile)."""
    try:
        wait_until(predicate, timeout, what, poll, ended=ended)
    except RuntimeError:
        raise RuntimeError(f"the fly ended while waiting for {what}") from None


def _fly(flyer: TrajectoryFlyer, det, md: dict, mode: str) -> MsgGenerator:
    @bpp.stage_decorator([flyer])
    @bpp.run_decorator(md=md)
    def inner():
        yield from bps.kickoff(flyer, wait=True)
        # collected also when the fly fails or is aborted: the frames taken so far go into
        # the run (the resource and datums are emitted at collect)
        yield from bpp.finalize_wrapper(bps.complete(flyer, wait=True), bps.collect(flyer))

    yield from _set_mode(det, mode)
    if is_async(det):  # ophyd-async's own flying: prepare, kickoff, collect while completing
        return (yield from fly_async(det, flyer.sample_stage, flyer.path, flyer.rate_hz, md))
    return (yield from inner())


def ptycho_fly_scan(
    det,
    stage,
    num: int = 963,
    step: float = 0.05,
    rate_hz: float = 500.0,
    center: Sequence[float] = (0.0, 0.0),
    *,
    md: dict | None = None,
    positions: PositionsConfig | None = None,
) -> MsgGenerator:
    """Fly the sample over a Fermat spiral, one frame per point, ``rate_hz`` frames/s.

    Parameters are those of :func:`~edgeloop.bluesky_plans.ptycho_scan`, plus ``rate_hz``
    (points per second) and ``positions`` (the NDAttributes the detector stamps the
    positions in: the configuration's ``[positions]``; default SampleX, SampleY).  The
    stage first moves to the spiral's first point; the run then kicks off the
    :class:`TrajectoryFlyer`, waits for it to complete and collects one event per frame
    into the ``primary`` stream: ``det_image`` (a datum in the detector's file),
    ``det_unique_id`` and the stage positions stamped on the frame.  The start document
    carries the keys of :func:`ptycho_scan` plus ``rate_hz`` and ``fly: True``.

    Raises
    ------
    ValueError
        Before any message, for invalid ``num``, ``step``, ``center``, ``rate_hz`` or
        positions outside the motors' limits.
    """
    attributes, positions = positions, spiral_positions(num, step, center)
    _check_limits(stage.x, positions[:, 0], "x")
    _check_limits(stage.y, positions[:, 1], "y")
    path = {"x": positions[:, 0], "y": positions[:, 1]}
    flyer = TrajectoryFlyer(det, stage, path, rate_hz, positions=attributes)
    cx, cy = _check_center(center)
    _md = {
        "plan_name": "ptycho_fly_scan",
        "plan_args": {
            "det": repr(det),
            "stage": repr(stage),
            "num": int(num),
            "step": float(step),
            "rate_hz": flyer.rate_hz,
            "center": [cx, cy],
        },
        "detectors": [det.name],
        "motors": [stage.x.name, stage.y.name],
        "num_points": int(num),
        "num_intervals": int(num) - 1,
        "step_um": _check_step(step),
        "center_um": [cx, cy],
        "rate_hz": flyer.rate_hz,
        "fly": True,
        "technique": "ptychography",
        "hints": {"dimensions": [(_fields(stage.x), "primary"), (_fields(stage.y), "primary")]},
    }
    _md.update(md or {})
    log.info("ptycho_fly_scan: %d points, step %.4g um at %.4g Hz", num, step, flyer.rate_hz)
    return _fly(flyer, det, _md, "ptycho")


def hedm_fly_scan(
    det,
    stage,
    start: float,
    stop: float,
    num: int,
    rate_hz: float = 100.0,
    *,
    md: dict | None = None,
    positions: PositionsConfig | None = None,
) -> MsgGenerator:
    """Rotate the sample from ``start`` to ``stop`` degrees without stopping, one HEDM frame
    at each of ``num`` evenly spaced angles, ``rate_hz`` frames/s.

    The documents are those of :func:`~edgeloop.bluesky_plans.hedm_rotation_scan` with the
    events collected as in :func:`ptycho_fly_scan` (``stage_rot`` holds each frame's
    stamped angle); the start document adds ``rate_hz`` and ``fly: True``.
    """
    angles = _check_angles(stage.rot, start, stop, num)
    start, stop, num = float(angles[0]), float(angles[-1]), len(angles)
    flyer = TrajectoryFlyer(det, stage, {"rot": angles}, rate_hz, positions=positions)
    _md = {
        "plan_name": "hedm_fly_scan",
        "plan_args": {
            "det": repr(det),
            "stage": repr(stage),
            "start": start,
            "stop": stop,
            "num": num,
            "rate_hz": flyer.rate_hz,
        },
        "detectors": [det.name],
        "motors": [stage.rot.name],
        "num_points": num,
        "num_intervals": num - 1,
        "omega_start_deg": start,
        "omega_stop_deg": stop,
        "omega_step_deg": (stop - start) / (num - 1) if num > 1 else 0.0,
        "rate_hz": flyer.rate_hz,
        "fly": True,
        "technique": "hedm",
        "hints": {"dimensions": [(_fields(stage.rot), "primary")]},
    }
    _md.update(md or {})
    log.info("hedm_fly_scan: %d angles %.4g..%.4g deg at %.4g Hz", num, start, stop, rate_hz)
    return _fly(flyer, det, _md, "hedm")
