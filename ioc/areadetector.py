"""areaDetector conventions for the simulated detector: ``X``/``X_RBV`` record pairs, the
choices of ADCore's templates (ADBase.template, NDFile.template), the camera records ophyd's
``AreaDetectorCam`` reads, and the NDArray a driver hands to its plugins."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from caproto import ChannelType
from caproto.server import PVGroup, PvpropertyChar, get_pv_pair_wrapper, pvproperty

# a setpoint and its readback; writing the setpoint updates the readback
rbv_pair = get_pv_pair_wrapper(setpoint_suffix="", readback_suffix="_RBV")


IMAGE_MODES = ["Single", "Multiple", "Continuous"]
TRIGGER_MODES = ["Internal", "External"]
DISABLE_ENABLE = ["Disable", "Enable"]
NO_YES = ["No", "Yes"]
DATA_TYPES = [
    "Int8",
    "UInt8",
    "Int16",
    "UInt16",
    "Int32",
    "UInt32",
    "Int64",
    "UInt64",
    "Float32",
    "Float64",
]
COLOR_MODES = ["Mono", "Bayer", "RGB1", "RGB2", "RGB3", "YUV444", "YUV422", "YUV421"]
CAMERA_COLOR_MODES = ["Mono", "RGB1", "RGB2", "RGB3"]  # simDetector.template narrows them
DETECTOR_STATES = [
    "Idle",
    "Acquire",
    "Readout",
    "Correct",
    "Saving",
    "Aborting",
    "Error",
    "Waiting",
    "Initializing",
    "Disconnected",
    "Aborted",
]


class CharWaveform(PvpropertyChar):
    """A writable char waveform of text (a path, a file name, an attributes file): a put of
    the empty string, which a client sends as one NUL, is taken; caproto 1.3's conversion
    refuses it."""

    async def write_from_dbr(self, data, data_type, metadata, *, flags=0):
        if data_type == ChannelType.CHAR and not bytes(np.asarray(data, np.uint8)).strip(b"\0"):
            return await self.write("", flags=flags)
        return await super().write_from_dbr(data, data_type, metadata, flags=flags)


def text(name: str, value: str = "", length: int = 256, **kwargs):
    """A char-waveform string record (a path is longer than an EPICS string's 40 characters);
    read-only with ``read_only=True``."""
    dtype = ChannelType.CHAR if kwargs.get("read_only") else CharWaveform
    return pvproperty(value=value, name=name, dtype=dtype, max_length=length, **kwargs)


def text_pair(name: str, value: str = "", length: int = 256, **kwargs):
    """A char-waveform string setpoint and its readback."""
    return rbv_pair(
        name=name,
        value=value,
        dtype=ChannelType.CHAR,
        max_length=length,
        setpoint_kw={"dtype": CharWaveform},
        **kwargs,
    )


def enum_index(value, choices: list[str]) -> int:
    """The index of an enum value, whether caproto holds it as its string or its index."""
    return choices.index(value) if isinstance(value, str) else int(value)


def data_type(dtype) -> str:
    """areaDetector's name of a numpy pixel type (``int32`` -> ``Int32``)."""
    name = np.dtype(dtype).name
    return next(t for t in DATA_TYPES if t.lower() == name)


def enum_pair(choices: list[str], index: int = 0, **kwargs):
    """An enum (mbbo/bo-like) setpoint and its readback, starting at ``choices[index]``."""
    return rbv_pair(value=choices[index], dtype=ChannelType.ENUM, enum_strings=choices, **kwargs)


def enum_readback(choices: list[str], name: str, index: int = 0):
    """A read-only enum (mbbi-like) readback, starting at ``choices[index]``."""
    return pvproperty(
        value=choices[index],
        name=name,
        dtype=ChannelType.ENUM,
        enum_strings=choices,
        read_only=True,
    )


async def _refuse_data_type(group, instance, value):
    raise ValueError("the simulated detector's data type follows its Mode")


async def _mono_only(group, instance, value):
    if enum_index(value, CAMERA_COLOR_MODES) != 0:
        raise ValueError("the simulated detector's frames are Mono")
    await group.readback.write(value)


async def _one_exposure(group, instance, value):
    if value != 1:
        raise ValueError("the simulated detector takes one exposure per frame")
    await group.readback.write(value)


async def _period(group, instance, value):
    if not 0 <= value <= 60:
        raise ValueError("AcquirePeriod must be within 0..60 s")
    await group.readback.write(value)


@dataclass
class NDArray:
    """One frame as a driver passes it to its plugins: pixels, uniqueId, time stamp (POSIX
    seconds) and NDAttributes."""

    data: np.ndarray
    unique_id: int
    timestamp: float
    attributes: dict = field(default_factory=dict)


class CamRecords(PVGroup):
    """The ADBase records of ``cam1:`` that ophyd's ``AreaDetectorCam`` and ``SingleTrigger``
    touch on connect, stage, trigger, describe and ``read_configuration``; the simulated
    camera (``edgeloop.ioc.beamline.Detector``) adds Acquire, AcquireTime, NumImages,
    ArrayCounter and the frame sizes, and keeps these readbacks current."""

    acquire_time_rbv = pvproperty(
        value=0.0, name="AcquireTime_RBV", precision=4, units="s", read_only=True
    )
    num_images_rbv = pvproperty(value=1, name="NumImages_RBV", read_only=True)
    acquire_period = rbv_pair(
        name="AcquirePeriod",
        value=0.0,
        put=_period,
        precision=4,
        units="s",
        doc="seconds between frame starts (at least AcquireTime)",
    )
    # Multiple by default: an Acquire takes NumImages frames, as it did before ImageMode
    image_mode = enum_pair(
        IMAGE_MODES, 1, name="ImageMode", doc="Single: 1 frame, Multiple: NumImages, Continuous"
    )
    trigger_mode = enum_pair(
        TRIGGER_MODES,
        name="TriggerMode",
        doc="Internal: frames every AcquirePeriod; External: one per trajectory pulse",
    )
    num_exposures = rbv_pair(
        name="NumExposures", value=1, put=_one_exposure, doc="exposures per frame (always 1)"
    )
    array_callbacks = enum_pair(
        DISABLE_ENABLE, 1, name="ArrayCallbacks", doc="pass frames to the plugins (Pva1, HDF1)"
    )
    # .DISA of DataType_RBV is read by ophyd (DetectorBase.dtype_numpy): it needs a record
    data_type = enum_pair(
        DATA_TYPES, 4, name="DataType", put=_refuse_data_type, readback_kw={"record": "mbbi"}
    )
    color_mode = enum_pair(CAMERA_COLOR_MODES, name="ColorMode", put=_mono_only)
    detector_state = enum_readback(DETECTOR_STATES, "DetectorState_RBV")
    num_images_counter = pvproperty(value=0, name="NumImagesCounter_RBV", read_only=True)
    manufacturer = pvproperty(
        value="edgeloop", name="Manufacturer_RBV", dtype=ChannelType.STRING, read_only=True
    )
    model = pvproperty(
        value="simulated ptycho/HEDM", name="Model_RBV", dtype=ChannelType.STRING, read_only=True
    )
    port_name = pvproperty(
        value="CAM1", name="PortName_RBV", dtype=ChannelType.STRING, read_only=True
    )
    array_size_z = pvproperty(value=0, name="ArraySizeZ_RBV", read_only=True)
    array_size_bytes = pvproperty(value=0, name="ArraySize_RBV", read_only=True)

    async def array_info(self, array: NDArray) -> None:
        """Readbacks describing the frame just taken (written only when they change)."""
        updates = (
            (self.data_type.readback, data_type(array.data.dtype)),
            (self.array_size_bytes, int(array.data.nbytes)),
        )
        for prop, value in updates:
            if prop.value != value:
                await prop.write(value)
