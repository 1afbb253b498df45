"""The simulated detector's file plugin, ``$(P)det:HDF1:``, behaving as areaDetector's
NDFileHDF5 (NDPluginFile.cpp, asynNDArrayDriver.cpp) does for the records that ophyd's
``HDF5Plugin`` and ``FileStoreHDF5IterativeWrite`` use.

- ``FilePath`` is checked when written (``FilePathExists_RBV``) and created first when
  ``CreateDirectory`` asks for it (0: never; n > 0: the first n levels are assumed to exist;
  n < 0: the last |n| levels may be created).
- ``FileWriteMode`` Single (with ``AutoSave``: one file per frame), Capture (``NumCapture``
  frames kept in memory, written to one file when the last arrives) or Stream (each frame
  appended while ``Capture`` is 1; ``NumCapture`` 0 means no limit).
- ``Capture`` = 1 opens ``FileTemplate % (FilePath, FileName, FileNumber)`` (``FileNumber``
  then increments when ``AutoIncrement`` is Yes), or with ``LazyOpen`` Yes (latched at
  Capture, Stream mode) at the first frame, which then needs no frame seen before;
  capturing ends, and the file is closed, on ``Capture`` = 0, after ``NumCapture`` frames,
  or on a write error.  ``Capture`` reads 1 while capturing; unlike areaDetector's busy
  record its put completes at once.
- Errors set ``WriteStatus`` to "Write error" with a ``WriteMessage``, and never stop the
  IOC: Capture before the plugin has seen a frame (areaDetector needs one to know the
  dimensions: ophyd's ``HDF5Plugin.warmup``), Capture in Single mode, a file that cannot be
  opened (missing path, permissions), a frame that cannot be written (disk full: capturing
  stops), a frame whose size or type differs from the file's (ignored).

Frames always pass with blocking callbacks: a frame is written before the camera's
``Acquire`` completes.  Files have NDFileHDF5's default layout::

    /entry/instrument/detector/data     (N, ny, nx), the frames; /entry/data/data links to it
    /entry/instrument/detector/NDAttributes/ColorMode  (N,)
    /entry/instrument/NDAttributes/NDArrayUniqueId     (N,) int32
    /entry/instrument/NDAttributes/NDArrayTimeStamp    (N,) float64, seconds since 1990 (EPICS)
    /entry/instrument/NDAttributes/NDArrayEpicsTSSec, NDArrayEpicsTSnSec  (N,) uint32
    /entry/instrument/NDAttributes/<name>              (N,) each NDAttribute of the first frame

written for SWMR (HDF5 1.10 "latest" format) and flushed after every frame, so a reader that
opens the file with ``swmr=True`` sees each frame as soon as it is written.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import resource
from pathlib import Path

import h5py
import numpy as np
from caproto import ChannelType
from caproto.server import PVGroup, pvproperty

from edgeloop.adfile import EPICS_EPOCH
from edgeloop.ioc.areadetector import (
    COLOR_MODES,
    DATA_TYPES,
    DISABLE_ENABLE,
    NO_YES,
    NDArray,
    data_type,
    enum_index,
    enum_pair,
    enum_readback,
    rbv_pair,
    text,
    text_pair,
)

log = logging.getLogger(__name__)

WRITE_MODES = ["Single", "Capture", "Stream"]
# Room kept free beyond two frames: HDF5 must still write its metadata to close the file.
# A write that fails inside HDF5 leaves the file in a state that crashes the library when
# it is closed or freed, so a full disk (or the process's file size limit) is caught here
# before it is hit.
CLOSING_ROOM = 64 * 1024
ATTRIBUTE_STRING = np.dtype("S40")  # an EPICS string


class PluginError(Exception):
    """What goes to WriteMessage."""


class NoRoom(OSError):
    """A frame the file system has no room for (the file is still whole and can be closed)."""


def _attribute_dtype(value) -> tuple[np.dtype, object]:
    """HDF5 type of an NDAttribute series, and the value written where a frame lacks it."""
    if isinstance(value, (str, bytes)):
        return ATTRIBUTE_STRING, b""
    if isinstance(value, (bool, int, np.integer)):
        return np.dtype(np.int64), 0
    return np.dtype(np.float64), np.nan


def _series(group: h5py.Group, name: str, dtype) -> h5py.Dataset:
    return group.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(256,), dtype=dtype)


def _nx(group: h5py.Group, nx_class: str) -> h5py.Group:
    group.attrs["NX_class"] = nx_class
    return group


class HDF5File:
    """One file in NDFileHDF5's default layout, opened for SWMR writing; its shape, pixel
    type and NDAttribute datasets come from the first frame (``first``, not written)."""

    def __init__(self, path: str, first: NDArray):
        self.path = path
        self.shape, self.dtype = first.data.shape, first.data.dtype
        self.count = 0
        self.file = h5py.File(path, "w", libver="latest")
        try:
            self._layout(first)
            self.file.swmr_mode = True  # every dataset must exist before this
        except BaseException:
            self.file.close()
            raise

    def _layout(self, first: NDArray) -> None:
        entry = _nx(self.file.create_group("entry"), "NXentry")
        instrument = _nx(entry.create_group("instrument"), "NXinstrument")
        detector = _nx(instrument.create_group("detector"), "NXdetector")
        ny, nx = self.shape
        self.data = detector.create_dataset(
            "data",
            shape=(0, ny, nx),
            maxshape=(None, ny, nx),
            chunks=(1, ny, nx),
            dtype=self.dtype,
        )
        self.data.attrs["signal"] = 1
        _nx(entry.create_group("data"), "NXdata")["data"] = self.data  # a hard link
        attributes = _nx(instrument.create_group("NDAttributes"), "NXcollection")
        detector_attributes = _nx(detector.create_group("NDAttributes"), "NXcollection")
        self.series = {
            "NDArrayUniqueId": _series(attributes, "NDArrayUniqueId", np.int32),
            "NDArrayTimeStamp": _series(attributes, "NDArrayTimeStamp", np.float64),
            "NDArrayEpicsTSSec": _series(attributes, "NDArrayEpicsTSSec", np.uint32),
            "NDArrayEpicsTSnSec": _series(attributes, "NDArrayEpicsTSnSec", np.uint32),
        }
        self.missing = {}  # NDAttribute name -> value written when a frame lacks it
        for name, value in first.attributes.items():
            dtype, self.missing[name] = _attribute_dtype(value)
            group = detector_attributes if name == "ColorMode" else attributes
            self.series[name] = _series(group, name, dtype)

    def fits(self, array: NDArray) -> bool:
        return array.data.shape == self.shape and array.data.dtype == self.dtype

    def no_room(self, array: NDArray) -> str | None:
        """Why ``array`` could not be written and the file still closed (a full disk, the
        process's file size limit), or None."""
        needed = os.path.getsize(self.path) + 2 * array.data.nbytes + CLOSING_ROOM
        limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if limit != resource.RLIM_INFINITY and needed > limit:
            return os.strerror(errno.EFBIG)
        disk = os.statvfs(self.path)
        if disk.f_bavail * disk.f_frsize < 2 * array.data.nbytes + CLOSING_ROOM:
            return os.strerror(errno.ENOSPC)
        return None

    def append(self, array: NDArray) -> None:
        """Write one frame and flush it (raises OSError when there is no room for it, and
        whatever HDF5 raises when the file system refuses a write)."""
        reason = self.no_room(array)
        if reason:
            raise NoRoom(reason)
        n = self.count
        seconds = int(array.timestamp)
        values = {
            "NDArrayUniqueId": array.unique_id,
            "NDArrayTimeStamp": array.timestamp - EPICS_EPOCH,
            "NDArrayEpicsTSSec": seconds - EPICS_EPOCH,
            "NDArrayEpicsTSnSec": int((array.timestamp - seconds) * 1e9),
        }
        for name, missing in self.missing.items():
            value = array.attributes.get(name, missing)
            values[name] = value.encode()[:40] if isinstance(value, str) else value
        self.data.resize(n + 1, axis=0)
        self.data[n] = array.data
        for name, dataset in self.series.items():
            dataset.resize(n + 1, axis=0)
            dataset[n] = values[name]
        self.file.flush()
        self.count = n + 1

    def close(self) -> None:
        self.file.close()


def create_path(path: str, depth: int) -> None:
    """Make the directories of ``path`` as areaDetector's ``createFilePath`` does for
    CreateDirectory = ``depth``; stops at the first that cannot be made."""
    parts = [p for p in path.split("/") if p]
    if depth == 0:
        return
    if depth < 0:
        depth = max(len(parts) + depth, 1)
    root = "/" if path.startswith("/") else ""
    for i in range(depth, len(parts)):
        try:
            os.mkdir(root + "/".join(parts[: i + 1]))
        except FileExistsError:
            continue
        except OSError:
            return


def file_name(template: str, path: str, name: str, number: int) -> str:
    """``template`` filled in like areaDetector's printf (``%s%s_%3.3d.h5``); a template that
    uses only the path and name is allowed, as in C."""
    try:
        return template % (path, name, number)
    except TypeError:
        return template % (path, name)


def _reason(exc: Exception) -> str:
    """The OS's words from an HDF5 error (which otherwise runs to several hundred characters)."""
    found = re.search(r"error message = '([^']+)'", str(exc))
    return found.group(1) if found else str(exc)


def _text(value: str) -> str:
    return value.split("\0", 1)[0]


async def _put_file_path(group, instance, value):
    path = _text(value)
    if path and not path.endswith("/"):
        path += "/"
    await group.parent.check_path(path, create=True)
    await group.readback.write(path)
    return path


async def _put_count(group, instance, value):
    if value < 0:
        raise ValueError("must be >= 0")
    await group.readback.write(value)


class NDFileHDF5(PVGroup):
    """``$(P)det:HDF1:``; the camera hands it each frame with :meth:`process`."""

    plugin_type = pvproperty(
        value="NDFileHDF5", name="PluginType_RBV", dtype=ChannelType.STRING, read_only=True
    )
    port_name = pvproperty(
        value="FileHDF1", name="PortName_RBV", dtype=ChannelType.STRING, read_only=True
    )
    nd_array_port = rbv_pair(name="NDArrayPort", value="CAM1", dtype=ChannelType.STRING)
    enable = enum_pair(DISABLE_ENABLE, name="EnableCallbacks", doc="take frames from the camera")
    blocking_callbacks = enum_pair(
        NO_YES, 1, name="BlockingCallbacks", doc="always Yes in effect: frames are written in turn"
    )
    array_counter = rbv_pair(name="ArrayCounter", value=0, doc="frames written")
    width = pvproperty(value=0, name="ArraySize0_RBV", read_only=True)
    height = pvproperty(value=0, name="ArraySize1_RBV", read_only=True)
    depth = pvproperty(value=0, name="ArraySize2_RBV", read_only=True)
    ndimensions = pvproperty(value=0, name="NDimensions_RBV", read_only=True)
    data_type = enum_readback(DATA_TYPES, "DataType_RBV", 4)
    color_mode = enum_readback(COLOR_MODES, "ColorMode_RBV")
    unique_id = pvproperty(value=0, name="UniqueId_RBV", read_only=True)
    time_stamp = pvproperty(value=0.0, name="TimeStamp_RBV", precision=3, read_only=True)

    file_path = text_pair("FilePath", put=_put_file_path)
    file_path_exists = pvproperty(
        value=NO_YES[0],
        name="FilePathExists_RBV",
        dtype=ChannelType.ENUM,
        enum_strings=NO_YES,
        read_only=True,
    )
    create_directory = rbv_pair(name="CreateDirectory", value=0, doc="see createFilePath")
    file_name = text_pair("FileName")
    file_template = text_pair("FileTemplate", "%s%s_%3.3d.h5")
    file_number = rbv_pair(name="FileNumber", value=1, put=_put_count)
    auto_increment = enum_pair(NO_YES, 1, name="AutoIncrement")
    auto_save = enum_pair(NO_YES, name="AutoSave")
    file_write_mode = enum_pair(WRITE_MODES, name="FileWriteMode")
    lazy_open = enum_pair(NO_YES, name="LazyOpen", doc="Stream: open the file at the first frame")
    num_capture = rbv_pair(name="NumCapture", value=1, put=_put_count, doc="0: no limit")
    num_captured = pvproperty(value=0, name="NumCaptured_RBV", read_only=True)
    capture = pvproperty(
        value="Done", name="Capture", dtype=ChannelType.ENUM, enum_strings=["Done", "Capture"]
    )
    capture_rbv = pvproperty(
        value="Done",
        name="Capture_RBV",
        dtype=ChannelType.ENUM,
        enum_strings=["Done", "Capturing"],
        read_only=True,
    )
    full_file_name = text("FullFileName_RBV", length=512, read_only=True)
    write_status = pvproperty(
        value="Write OK",
        name="WriteStatus",
        dtype=ChannelType.ENUM,
        enum_strings=["Write OK", "Write error"],
        read_only=True,
    )
    write_message = text("WriteMessage", read_only=True)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a simulation writes only under this folder (a real NDFileHDF5 writes where its
        # user may; this one runs as whoever started it, and a CA client names the path)
        self.root: Path | None = None
        self._lock = asyncio.Lock()  # one file operation at a time
        self._last: NDArray | None = None  # what areaDetector keeps as pArrays[0]
        self._capturing = False
        self._lazy = False  # LazyOpen as latched when Capture started
        self._file: HDF5File | None = None
        self._buffer: list[NDArray] = []
        # files HDF5 failed to write: closing or freeing them would crash the library
        self._broken: list[HDF5File] = []

    def _choice(self, pair, choices: list[str]) -> str:
        return choices[enum_index(pair.setpoint.value, choices)]

    def outside(self, path: str) -> str | None:
        """Why ``path`` may not be written here (outside ``root``), or None."""
        if self.root is None or not path:
            return None
        root = os.path.realpath(self.root)
        if os.path.commonpath([root, os.path.realpath(path)]) == root:
            return None
        return f"{path} is outside the simulation's data directory {root}: refused"

    async def check_path(self, path: str, create: bool = False) -> bool:
        refusal = self.outside(path)
        if refusal:
            await self._error(refusal)
        elif create and path and not os.path.isdir(path):
            create_path(path, int(self.create_directory.setpoint.value))
        exists = not refusal and bool(path) and os.path.isdir(path)
        await self.file_path_exists.write(NO_YES[exists])
        return exists

    async def _error(self, message: str) -> None:
        log.warning("%s %s", self.prefix, message)
        await self.write_status.write("Write error")
        await self.write_message.write(message[:255])

    @capture.putter
    async def capture(self, instance, value):
        if enum_index(value, ["Done", "Capture"]) == 0:
            async with self._lock:
                await self._end_capture()
            return "Done"
        async with self._lock:
            if self._capturing:
                return "Capture"
            try:
                await self._start_capture()
            except PluginError as exc:
                await self._error(str(exc))
                return "Done"
        return "Capture"

    async def _start_capture(self) -> None:
        await self.write_status.write("Write OK")
        await self.write_message.write("")
        await self.full_file_name.write("")
        self._lazy = self._choice(self.lazy_open, NO_YES) == "Yes"
        mode = self._choice(self.file_write_mode, WRITE_MODES)
        if mode == "Single":
            raise PluginError("ERROR: capture not supported in Single mode")
        if self._last is None and (mode == "Capture" or not self._lazy):
            raise PluginError("ERROR, must collect an array to get dimensions first")
        self._buffer = []
        if mode == "Stream" and not self._lazy:
            self._file = await self._open(self._last)
        elif self._lazy:
            await self.write_message.write("Lazy Open...")
        await self.num_captured.write(0)
        self._capturing = True
        await self.capture_rbv.write("Capturing")
        log.info("%s capturing (%s) %s", self.prefix, mode, self.full_file_name.value)

    async def _end_capture(self, broken: bool = False) -> None:
        """Close the file (Stream; left open when HDF5 failed to write it) and set Capture
        back to Done; the lock is held."""
        self._capturing = False
        self._buffer = []
        if broken and self._file is not None:
            self._broken.append(self._file)
            self._file = None
        if self._file is not None:
            file, self._file = self._file, None
            try:
                await asyncio.to_thread(file.close)
            except Exception as exc:
                if self.write_status.value == "Write OK":  # keep the message of a write error
                    await self._error(f"Error closing file {file.path}: {_reason(exc)}")
        await self.capture_rbv.write("Done")
        if self.capture.value != "Done":
            await self.capture.write("Done", verify_value=False)

    async def _open(self, first: NDArray) -> HDF5File:
        path = _text(self.file_path.setpoint.value)
        await self.check_path(path)
        number = int(self.file_number.setpoint.value)
        try:
            name = file_name(
                _text(self.file_template.setpoint.value),
                path,
                _text(self.file_name.setpoint.value),
                number,
            )
        except (TypeError, ValueError):
            raise PluginError("Error creating full file name") from None
        if self._choice(self.auto_increment, NO_YES) == "Yes":
            await self.file_number.setpoint.write(number + 1)
        await self.full_file_name.write(name)
        refusal = self.outside(name)  # FileName and FileTemplate can climb out, too
        if refusal:
            raise PluginError(refusal)
        try:
            return await asyncio.to_thread(HDF5File, name, first)
        except Exception as exc:
            raise PluginError(f"Error opening file {name}: {_reason(exc)}") from None

    async def _write_file(self, arrays: list[NDArray]) -> None:
        """One file holding ``arrays`` (Single and Capture modes)."""

        def write(file: HDF5File) -> None:
            try:
                for array in arrays:
                    file.append(array)
            except NoRoom:
                file.close()
                raise
            file.close()

        try:
            file = await self._open(arrays[0])
        except PluginError as exc:
            await self._error(str(exc))
            return
        try:
            await asyncio.to_thread(write, file)
        except Exception as exc:
            if not isinstance(exc, NoRoom):
                self._broken.append(file)
            await self._error(f"Error writing file {file.path}: {_reason(exc)}")
            return
        await self.array_counter.setpoint.write(self.array_counter.setpoint.value + len(arrays))

    async def process(self, array: NDArray) -> None:
        """Take one frame from the camera (ignored unless EnableCallbacks is Enable)."""
        if self._choice(self.enable, DISABLE_ENABLE) == "Disable":
            return
        await self._array_info(array)
        async with self._lock:
            self._last = array
            mode = self._choice(self.file_write_mode, WRITE_MODES)
            if mode == "Single":
                if self._choice(self.auto_save, NO_YES) == "Yes":
                    await self._write_file([array])
            elif self._capturing and mode == "Capture":
                await self._buffer_frame(array)
            elif self._capturing:
                await self._stream(array)

    async def _buffer_frame(self, array: NDArray) -> None:
        self._buffer.append(array)
        await self.num_captured.write(len(self._buffer))
        if len(self._buffer) >= int(self.num_capture.setpoint.value):
            if self._choice(self.auto_save, NO_YES) == "Yes":
                await self._write_file(self._buffer)
            await self._end_capture()

    async def _stream(self, array: NDArray) -> None:
        if self._file is None and self._lazy and self.num_captured.value == 0:
            try:
                self._file = await self._open(array)
            except PluginError as exc:
                await self._error(str(exc))
                await self._end_capture()
                return
        file = self._file
        if file is None:  # FileWriteMode changed while capturing
            return
        if not file.fits(array):
            await self._error("Invalid frame. Ignoring.")
            return
        try:
            await asyncio.to_thread(file.append, array)
        except Exception as exc:
            await self._error(
                f"Error writing frame {array.unique_id} to {file.path}: {_reason(exc)}"
            )
            await self._end_capture(broken=not isinstance(exc, NoRoom))
            return
        await self.num_captured.write(file.count)
        await self.array_counter.setpoint.write(self.array_counter.setpoint.value + 1)
        limit = int(self.num_capture.setpoint.value)
        if limit and file.count >= limit:
            await self._end_capture()

    async def _array_info(self, array: NDArray) -> None:
        ny, nx = array.data.shape
        for prop, value in (
            (self.width, nx),
            (self.height, ny),
            (self.ndimensions, 2),
            (self.data_type, data_type(array.data.dtype)),
        ):
            if prop.value != value:
                await prop.write(value)
        await self.unique_id.write(array.unique_id)
        await self.time_stamp.write(array.timestamp - EPICS_EPOCH)
