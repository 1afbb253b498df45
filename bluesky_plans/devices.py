"""Ophyd devices for the (simulated or real) beamline.

The sample stage is three motor records (``$(P)SampleX``, ``$(P)SampleY`` in micrometres,
``$(P)SampleRot`` in degrees).  The detector comes in two forms:

- :class:`PtychoDetector`: its controls (``$(P)det:cam1:*``) are read over Channel Access,
  its frames over pvAccess as NTNDArray (``$(P)det:Pva1:Image``) and copied into the events.
- :class:`AreaDetector`: ophyd's stock areaDetector classes (``$(P)det:cam1:`` and the HDF5
  file plugin ``$(P)det:HDF1:``); the IOC writes the frames to HDF5 and the events carry
  datum ids that point into the file (``resource``/``datum`` documents).  It works the same
  with any areaDetector IOC.

Call :func:`edgeloop.config.pin_loopback` before importing this module when the simulated
beamline serves Channel Access on its own port.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
from ophyd import Component as Cpt
from ophyd import (
    Device,
    DeviceStatus,
    EpicsMotor,
    EpicsSignal,
    EpicsSignalRO,
    EpicsSignalWithRBV,
    Signal,
)
from ophyd import FormattedComponent as FCpt
from ophyd.areadetector import ADComponent as ADCpt
from ophyd.areadetector.cam import AreaDetectorCam
from ophyd.areadetector.detectors import DetectorBase
from ophyd.areadetector.filestore_mixins import FileStoreHDF5IterativeWrite
from ophyd.areadetector.plugins import HDF5Plugin
from ophyd.areadetector.trigger_mixins import ADTriggerStatus, SingleTrigger
from ophyd.device import Staged

from edgeloop import ntnd
from edgeloop.config import Config

log = logging.getLogger(__name__)

__all__ = [
    "AreaDetector",
    "HDF5PluginWithFileStore",
    "PtychoDetector",
    "PvaImageSignal",
    "ProfileMove",
    "SampleStage",
    "SimDetector",
    "make_ad_devices",
    "make_devices",
]

# Seconds the IOC gets to open its file once Capture is set; ophyd would wait without limit.
CAPTURE_TIMEOUT_S = 10.0


class ProfileMove(Device):
    """A profile-move (trajectory) controller as the EPICS motor module's profileMove
    records: positions per axis, a fixed time per point, Build and Execute.  M1..M3 drive
    SampleX, SampleY and SampleRot."""

    num_points = Cpt(EpicsSignal, "NumPoints", kind="config")
    fixed_time = Cpt(EpicsSignal, "FixedTime", kind="config")
    m1_positions = Cpt(EpicsSignal, "M1Positions", kind="omitted")
    m2_positions = Cpt(EpicsSignal, "M2Positions", kind="omitted")
    m3_positions = Cpt(EpicsSignal, "M3Positions", kind="omitted")
    m1_use = Cpt(EpicsSignal, "M1UseAxis", string=True, kind="omitted")
    m2_use = Cpt(EpicsSignal, "M2UseAxis", string=True, kind="omitted")
    m3_use = Cpt(EpicsSignal, "M3UseAxis", string=True, kind="omitted")
    build = Cpt(EpicsSignal, "Build", put_complete=True, kind="omitted")
    build_status = Cpt(EpicsSignalRO, "BuildStatus", string=True, kind="omitted")
    build_message = Cpt(EpicsSignalRO, "BuildMessage", string=True, kind="omitted")
    execute = Cpt(EpicsSignal, "Execute", put_complete=True, kind="omitted")
    execute_state = Cpt(EpicsSignalRO, "ExecuteState", string=True, kind="omitted")
    execute_status = Cpt(EpicsSignalRO, "ExecuteStatus", string=True, kind="omitted")
    execute_message = Cpt(EpicsSignalRO, "ExecuteMessage", string=True, kind="omitted")
    abort = Cpt(EpicsSignal, "Abort", kind="omitted")
    current_point = Cpt(EpicsSignalRO, "CurrentPoint_RBV", kind="omitted")

    # stage axis -> (positions, use-axis) components
    AXES = {
        "x": ("m1_positions", "m1_use"),
        "y": ("m2_positions", "m2_use"),
        "rot": ("m3_positions", "m3_use"),
    }


class SampleStage(Device):
    """Sample stage: ``x`` on ``$(P)SampleX``, ``y`` on ``$(P)SampleY`` (micrometres), the
    rotation ``rot`` on ``$(P)SampleRot`` (degrees) and their trajectory controller
    ``profile`` on ``$(P)Prof1:`` (fly scans)."""

    x = Cpt(EpicsMotor, "SampleX")
    y = Cpt(EpicsMotor, "SampleY")
    rot = Cpt(EpicsMotor, "SampleRot")
    profile = Cpt(ProfileMove, "Prof1:", kind="omitted")


class PvaImageSignal(Signal):
    """Read-only signal holding the newest NTNDArray frame of a pvAccess PV as a 2-D array.

    Parameters
    ----------
    pv_name : str
        The NTNDArray PV, e.g. ``"SIM:det:Pva1:Image"``.
    context : p4p.client.thread.Context, optional
        A p4p client context to share; one (``'pva'``, ``nt=False``) is made when omitted.
    fetch_timeout : float
        Seconds allowed for one pvAccess get.
    **kwargs
        Passed to :class:`ophyd.Signal` (``name``, ``parent``, ``kind`` ...).

    Notes
    -----
    :meth:`get` fetches a fresh frame; :meth:`read` reports the frame of the latest fetch
    (the one :meth:`PtychoDetector.trigger` took), fetching only when none was taken yet.
    A sibling ``unique_id`` signal, when given via :attr:`unique_id_signal`, is updated with
    the uniqueId of every fetched frame.
    """

    def __init__(self, pv_name: str, *, context=None, fetch_timeout: float = 5.0, **kwargs):
        kwargs.setdefault("value", None)
        super().__init__(**kwargs)
        self.pv_name = pv_name
        self.fetch_timeout = fetch_timeout
        self._context = context
        self._frame: ntnd.Frame | None = None
        self._fetch_lock = threading.Lock()
        self.unique_id_signal: Signal | None = None

    @property
    def context(self):
        """The p4p client context, created on first use."""
        if self._context is None:
            from p4p.client.thread import Context

            self._context = Context("pva", nt=False)
        return self._context

    @property
    def frame(self) -> ntnd.Frame | None:
        """The last fetched :class:`edgeloop.ntnd.Frame`, or None."""
        return self._frame

    def fetch(self) -> ntnd.Frame:
        """Get the PV once, decode it and cache it; returns the frame.

        Raises
        ------
        edgeloop.ntnd.FrameError
            When the NTNDArray cannot be decoded into a 2-D frame.
        TimeoutError
            When the PV does not answer within ``fetch_timeout``.
        """
        with self._fetch_lock:
            value = self.context.get(self.pv_name, timeout=self.fetch_timeout)
            frame = ntnd.decode(value)
            self._frame = frame
            stamp = frame.timestamp or frame.received
            if self.unique_id_signal is not None:
                self.unique_id_signal.put(frame.unique_id, timestamp=stamp, force=True)
            super().put(frame.data, timestamp=stamp, force=True)
            return frame

    def get(self, **kwargs) -> np.ndarray:
        """Fetch a fresh frame over pvAccess and return its 2-D pixel array."""
        return self.fetch().data

    def read(self) -> dict:
        """The cached frame (fetched now if none yet) in ophyd's ``read()`` form."""
        if self._frame is None:
            self.fetch()
        return {self.name: {"value": self._frame.data, "timestamp": self.timestamp}}

    def describe(self) -> dict:
        """Data key of the frame: ``dtype='array'``, ``shape=[ny, nx]`` (no ``external``)."""
        if self._frame is None:
            try:
                self.fetch()
            except TimeoutError as exc:
                raise TimeoutError(
                    f"{self.name}: no frame on {self.pv_name} yet, so its shape "
                    "is unknown; trigger the detector first"
                ) from exc
        data = self._frame.data
        return {
            self.name: {
                "source": f"PVA:{self.pv_name}",
                "dtype": "array",
                "shape": list(data.shape),
                "dtype_numpy": data.dtype.str,
            }
        }

    def put(self, value, **kwargs):
        raise PermissionError(f"{self.name} ({self.pv_name}) is read-only")

    def set(self, value, **kwargs):
        raise PermissionError(f"{self.name} ({self.pv_name}) is read-only")

    def destroy(self):
        if self._context is not None:
            try:
                self._context.close()
            except Exception:  # pragma: no cover - best effort at teardown
                log.debug("closing p4p context failed", exc_info=True)
            self._context = None
        super().destroy()


class PtychoDetector(Device):
    """The beamline detector: cam1 controls over CA, frames over pvAccess.

    ``mode`` (``det:cam1:Mode``) selects the technique, ``"ptycho"`` or ``"hedm"``; the
    plans set it.

    Parameters
    ----------
    prefix : str
        Beamline prefix, e.g. ``"SIM:"``; the cam is ``f"{prefix}det:cam1:"``.
    name : str
        Ophyd name; data keys become ``<name>_image`` and ``<name>_unique_id``.
    image_pv : str, optional
        NTNDArray PV; defaults to ``f"{prefix}det:Pva1:Image"``.
    trigger_timeout : float
        Seconds allowed, beyond ``AcquireTime * NumImages``, for one trigger to complete.
    **kwargs
        Passed to :class:`ophyd.Device`.

    Notes
    -----
    :meth:`trigger` puts ``Acquire=1`` with put completion, then fetches the frame and checks
    that its uniqueId equals ``ArrayCounter_RBV`` (refetching briefly when the PVA update lags
    the CA put); the status fails with a :class:`TimeoutError` otherwise.  Staging sets
    ``NumImages=1`` and ``ArrayCounter=0`` so uniqueIds restart at 1 in every scan.
    """

    acquire = Cpt(EpicsSignal, "det:cam1:Acquire", put_complete=True, kind="omitted")
    acquire_time = Cpt(EpicsSignal, "det:cam1:AcquireTime", kind="config")
    num_images = Cpt(EpicsSignal, "det:cam1:NumImages", kind="config")
    mode = Cpt(EpicsSignal, "det:cam1:Mode", string=True, kind="config")
    array_counter = Cpt(EpicsSignal, "det:cam1:ArrayCounter", kind="omitted")
    array_counter_rbv = Cpt(EpicsSignalRO, "det:cam1:ArrayCounter_RBV", kind="omitted")
    image = FCpt(PvaImageSignal, "{image_pv}", kind="normal")
    unique_id = Cpt(Signal, value=0, kind="normal")

    def __init__(
        self,
        prefix: str,
        *,
        name: str,
        image_pv: str | None = None,
        trigger_timeout: float = 10.0,
        **kwargs,
    ):
        self.image_pv = image_pv or f"{prefix}det:Pva1:Image"  # read by the image FCpt
        self.trigger_timeout = trigger_timeout
        super().__init__(prefix, name=name, **kwargs)
        self.image.unique_id_signal = self.unique_id
        self.stage_sigs["num_images"] = 1
        self.stage_sigs["array_counter"] = 0

    def stage(self) -> list:
        """Apply ``stage_sigs`` (NumImages=1, ArrayCounter=0) and the sub-devices' staging.

        ArrayCounter is not put back at unstage: uniqueIds of later frames should continue
        from the scan's last frame rather than jump back to the value before the scan.
        """
        staged = super().stage()
        self._original_vals.pop(self.array_counter, None)
        return staged

    @property
    def hints(self) -> dict:
        return {"fields": [self.unique_id.name]}

    def trigger(self) -> DeviceStatus:
        """Take one frame; the status finishes once the matching frame has been fetched."""
        status = DeviceStatus(self)
        threading.Thread(
            target=self._acquire_one, args=(status,), daemon=True, name=f"{self.name}-trigger"
        ).start()
        return status

    def _acquire_one(self, status: DeviceStatus) -> None:
        try:
            exposure = float(self.acquire_time.get() or 0.0)
            images = max(int(self.num_images.get() or 1), 1)
            timeout = self.trigger_timeout + exposure * images
            self.acquire.set(1, timeout=timeout).wait(timeout)
            expected = int(self.array_counter_rbv.get(use_monitor=False))
            deadline = time.monotonic() + self.trigger_timeout
            while True:
                frame = self.image.fetch()
                if frame.unique_id == expected:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name}: frame on {self.image_pv} has uniqueId {frame.unique_id} "
                        f"but ArrayCounter_RBV is {expected} after {self.trigger_timeout} s; "
                        "is the PVA plugin enabled and publishing every frame?"
                    )
                time.sleep(0.01)
        except Exception as exc:
            log.error("%s trigger failed: %s", self.name, exc)
            status.set_exception(exc)
        else:
            status.set_finished()


class HDF5PluginWithFileStore(HDF5Plugin, FileStoreHDF5IterativeWrite):
    """ophyd's HDF5 file plugin writing one file per run (FileWriteMode Stream) and emitting
    a ``resource`` document (spec ``AD_HDF5``, ``frame_per_point``) and one ``datum``
    (``point_number``) per trigger.

    Added to the stock classes: ``LazyOpen`` is staged to No (see ``__init__``); ophyd
    checks ``FilePathExists_RBV`` only after setting ``Capture`` = 1 and waiting, without
    limit, for ``Capture_RBV``, which never comes when the IOC cannot open the file.  Here
    the path is set and checked first (:meth:`make_filename`), and Capture gets
    :data:`CAPTURE_TIMEOUT_S`; either failure stops staging with an ``OSError`` that quotes
    the plugin's ``WriteMessage``.
    """

    capture = ADCpt(EpicsSignalWithRBV, "Capture", write_timeout=CAPTURE_TIMEOUT_S)
    lazy_open = ADCpt(EpicsSignalWithRBV, "LazyOpen", string=True, kind="config")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the resource names FileNumber - 1, which is only so once Capture has opened the
        # file: with LazyOpen Yes (as ophyd-async leaves it) a real NDFileHDF5 opens it at
        # the first frame. Set first, before Capture.
        self.stage_sigs = type(self.stage_sigs)([("lazy_open", "No"), *self.stage_sigs.items()])

    def make_filename(self):
        filename, read_path, write_path = super().make_filename()
        self.file_path.set(write_path).wait()
        if not self.file_path_exists.get(use_monitor=False):
            raise OSError(
                f"{self.name}: the IOC has no directory {write_path} (FilePathExists_RBV is 0) "
                "and did not create it; check the path and that the IOC can write there"
            )
        return filename, read_path, write_path

    def stage(self):
        try:
            return super().stage()
        except TimeoutError as exc:
            message = whole_text(self.write_message)
            raise OSError(f"{self.name}: Capture did not start: {message}") from exc


def whole_text(signal) -> str:
    """A char-waveform string (WriteMessage) read whole from the IOC.  pyepics asks for as
    many elements as the last monitor update held, so a plain read made before the update of
    a longer new message arrives returns that message's first characters."""
    return signal.get(use_monitor=False, count=1 << 16)  # pyepics caps it at the PV's NELM


class AreaDetector(SingleTrigger, DetectorBase):
    """An areaDetector from ophyd's stock classes: camera ``cam1:`` and HDF5 plugin ``HDF1:``.

    Each trigger acquires one frame (staging sets ImageMode Multiple and NumImages 1; change
    ``stage_sigs["cam.num_images"]`` for more per point) and completes when
    ``Acquire_RBV`` returns to 0; the plugin appends them to the run's file.  The event field
    ``<name>_image`` holds a datum id, not the frames (shape ``(NumImages, ny, nx)``, external
    ``FILESTORE:``).

    Parameters
    ----------
    prefix : str
        The detector's prefix, e.g. ``"SIM:det:"``.
    write_path_template : str
        Directory (a ``strftime`` template) the IOC writes files to.
    read_path_template : str, optional
        The same directory as mounted here, when it differs.
    **kwargs
        Passed to ophyd's ``DetectorBase`` (``name``, ...).
    """

    _default_read_attrs = ("hdf1",)

    cam = ADCpt(AreaDetectorCam, "cam1:")
    hdf1 = ADCpt(HDF5PluginWithFileStore, "HDF1:", write_path_template="/")
    # Acquire with put completion (areaDetector's busy record): done when the frames are;
    # cam.acquire compares its readback, which a fast frame has already reset
    acquire_busy = ADCpt(EpicsSignal, "cam1:Acquire", put_complete=True, kind="omitted")

    def __init__(
        self, prefix: str, *, write_path_template: str, read_path_template=None, **kwargs
    ):
        super().__init__(prefix, **kwargs)
        self.hdf1.write_path_template = write_path_template
        self.hdf1.read_path_template = read_path_template
        # one frame per trigger (a step scan's point), whatever NumImages was left at
        self.stage_sigs["cam.num_images"] = 1
        # uniqueIds restart at 1 in every run: the edge starts a new map on a lower uniqueId
        self.stage_sigs["cam.array_counter"] = 0

    def stage(self) -> list:
        """ophyd's staging; ArrayCounter is not put back at unstage, so the uniqueIds of
        later frames continue from the run's last frame."""
        staged = super().stage()
        self._original_vals.pop(self.cam.array_counter, None)
        return staged

    def trigger(self) -> ADTriggerStatus:
        """SingleTrigger's trigger, returning its status even when the acquisition is over
        before this method is: SingleTrigger returns ``self._status``, which its Acquire
        callback resets to None at the end of the acquisition, so a detector faster than the
        call (a few milliseconds) would hand the RunEngine None."""
        if self._staged != Staged.yes:
            raise RuntimeError(f"{self.name} is not staged; stage it before triggering")
        self._status = status = self._status_type(self)
        self._acquisition_signal.put(1, wait=False)
        self.generate_datum(self._image_name, time.time(), {})
        return status


class SimDetector(AreaDetector):
    """The simulated beamline's areaDetector: :class:`AreaDetector` plus its technique
    ``mode`` (``cam1:Mode``, ``"ptycho"`` or ``"hedm"``), which the plans set."""

    mode = ADCpt(EpicsSignal, "cam1:Mode", string=True, kind="config")


def make_ad_devices(
    prefix: str = "SIM:",
    data_dir: str | Path = ".",
    timeout: float = 10.0,
    warmup: bool = True,
    detector_class: type[AreaDetector] = AreaDetector,
) -> tuple[AreaDetector, SampleStage]:
    """Build an areaDetector (``det`` on ``{prefix}det:``) and the stage; wait for them.

    Parameters
    ----------
    prefix : str
        Beamline PV prefix.
    data_dir : str or Path
        Directory the IOC writes the HDF5 files to (the same path here and on the IOC).
    timeout : float
        Seconds to wait for the Channel Access connections.
    warmup : bool
        Take one frame (ophyd's ``HDF5Plugin.warmup``, about 3 s) when the file plugin has
        seen none since its IOC started: it refuses to stage before.
    detector_class : type
        :class:`AreaDetector` or a subclass (:class:`SimDetector`).

    Returns
    -------
    det : AreaDetector
    stage : SampleStage
    """
    directory = f"{Path(data_dir).expanduser().resolve()}/"
    det = detector_class(f"{prefix}det:", name="det", write_path_template=directory)
    stage = SampleStage(prefix, name="stage")
    det.wait_for_connection(timeout=timeout)
    stage.wait_for_connection(timeout=timeout)
    if warmup and not any(det.hdf1.array_size.get()):
        det.hdf1.warmup()
    log.info("areaDetector devices on %s connected, files to %s", prefix, directory)
    return det, stage


def make_devices(
    prefix: str = "SIM:", data_dir: str | Path | None = None, timeout: float = 10.0
) -> tuple[SimDetector, SampleStage]:
    """The simulated beamline's detector (:class:`SimDetector`) and stage, connected.

    Parameters
    ----------
    prefix : str
        Beamline PV prefix.
    data_dir : str or Path, optional
        Where the IOC writes the frames; default ``detector/`` under the configured data
        directory (``~/.edgeloop/data``).
    timeout : float
        Seconds to wait for the Channel Access connections.
    """
    if data_dir is None:
        data_dir = Config().data_path / "detector"
    Path(data_dir).expanduser().mkdir(parents=True, exist_ok=True)
    return make_ad_devices(prefix, data_dir, timeout, detector_class=SimDetector)
