"""A small areaDetector-like Channel Access server that shares nothing with edgeloop: the
``cam1:`` and ``HDF1:`` records ophyd's stock areaDetector classes use, 24 x 32 UInt16
frames (pixel value = index + uniqueId), written by ``HDF1:`` in Stream mode to
``/entry/data/data`` with ``/entry/instrument/NDAttributes/NDArrayUniqueId``.

``python ad_server.py PREFIX`` serves ``PREFIX cam1:*`` and ``PREFIX HDF1:*`` on the port in
EPICS_CA_SERVER_PORT until interrupted (test_area_detector.py starts and stops it)."""

import asyncio
import os
import sys

import h5py
import numpy as np
from caproto import ChannelType
from caproto.server import PVGroup, SubGroup, get_pv_pair_wrapper, pvproperty, run

NY, NX = 24, 32
DATA, UID = "entry/data/data", "entry/instrument/NDAttributes/NDArrayUniqueId"
pair = get_pv_pair_wrapper()


def choice(name, choices, index=0, **kwargs):
    return pair(
        name=name, value=choices[index], dtype=ChannelType.ENUM, enum_strings=choices, **kwargs
    )


def text(name, value="", **kwargs):
    return pair(name=name, value=value, dtype=ChannelType.CHAR, max_length=256, **kwargs)


def frame(uid: int) -> np.ndarray:
    return (np.arange(NY * NX).reshape(NY, NX) + uid).astype(np.uint16)


class Cam(PVGroup):
    acquire = pvproperty(
        name="Acquire", value="Done", dtype=ChannelType.ENUM, enum_strings=["Done", "Acquire"]
    )
    acquire_rbv = pvproperty(
        name="Acquire_RBV",
        value="Done",
        dtype=ChannelType.ENUM,
        enum_strings=["Done", "Acquiring"],
        read_only=True,
    )
    image_mode = choice("ImageMode", ["Single", "Multiple", "Continuous"])
    trigger_mode = choice("TriggerMode", ["Internal"])
    array_callbacks = choice("ArrayCallbacks", ["Disable", "Enable"], 1)
    data_type = choice(
        "DataType", ["Int8", "UInt8", "Int16", "UInt16"], 3, readback_kw={"record": "mbbi"}
    )
    num_images = pair(name="NumImages", value=1)
    num_exposures = pair(name="NumExposures", value=1)
    acquire_time = pair(name="AcquireTime", value=0.01)
    acquire_period = pair(name="AcquirePeriod", value=0.0)
    array_counter = pair(name="ArrayCounter", value=0)
    size_x = pvproperty(name="ArraySizeX_RBV", value=NX, read_only=True)
    size_y = pvproperty(name="ArraySizeY_RBV", value=NY, read_only=True)
    size_z = pvproperty(name="ArraySizeZ_RBV", value=0, read_only=True)
    manufacturer = pvproperty(name="Manufacturer_RBV", value="tests", dtype=ChannelType.STRING)
    model = pvproperty(name="Model_RBV", value="ad_server", dtype=ChannelType.STRING)
    port_name = pvproperty(name="PortName_RBV", value="CAM", dtype=ChannelType.STRING)

    @acquire.putter
    async def acquire(self, instance, value):
        if value == "Done":
            return value
        await self.acquire_rbv.write("Acquiring")
        for _ in range(self.num_images.setpoint.value):
            await asyncio.sleep(self.acquire_time.setpoint.value)
            uid = self.array_counter.setpoint.value + 1
            self.parent.hdf1.append(frame(uid), uid)
            await self.array_counter.setpoint.write(uid)
        await self.acquire_rbv.write("Done")
        return "Done"


async def _capture(group, instance, value):
    hdf = group.parent
    if hdf.file is not None:
        hdf.file.close()
        hdf.file = None
    if value:
        path, name, template = (
            v.setpoint.value.split("\0")[0]
            for v in (hdf.file_path, hdf.file_name, hdf.file_template)
        )
        number = hdf.file_number.setpoint.value
        hdf.file = h5py.File(template % (path, name, number), "w")
        hdf.file.create_dataset(DATA, (0, NY, NX), np.uint16, maxshape=(None, NY, NX))
        hdf.file.create_dataset(UID, (0,), np.int32, maxshape=(None,))
        await hdf.file_number.setpoint.write(number + 1)  # before Capture_RBV: ophyd reads it
    await group.readback.write(value)


class HDF(PVGroup):
    plugin_type = pvproperty(name="PluginType_RBV", value="NDFileHDF5", dtype=ChannelType.STRING)
    port_name = pvproperty(name="PortName_RBV", value="HDF", dtype=ChannelType.STRING)
    nd_array_port = pair(name="NDArrayPort", value="CAM", dtype=ChannelType.STRING)
    enable = choice("EnableCallbacks", ["Disable", "Enable"])
    blocking = choice("BlockingCallbacks", ["No", "Yes"])
    array_counter = pair(name="ArrayCounter", value=0)
    width = pvproperty(name="ArraySize0_RBV", value=NX)
    height = pvproperty(name="ArraySize1_RBV", value=NY)
    depth = pvproperty(name="ArraySize2_RBV", value=0)
    file_path = text("FilePath")
    file_path_exists = pvproperty(name="FilePathExists_RBV", value=1)
    file_name = text("FileName")
    file_template = text("FileTemplate", "%s%s_%3.3d.h5")
    file_number = pair(name="FileNumber", value=0)
    auto_increment = choice("AutoIncrement", ["No", "Yes"])
    auto_save = choice("AutoSave", ["No", "Yes"])
    file_write_mode = choice("FileWriteMode", ["Single", "Capture", "Stream"])
    lazy_open = choice("LazyOpen", ["No", "Yes"])  # stored: a capture opens its file at once
    num_capture = pair(name="NumCapture", value=0)
    capture = pair(name="Capture", value=0, put=_capture)
    file = None  # the open h5py.File while capturing

    def append(self, data, uid):
        if self.file is not None:
            for key, value in ((DATA, data), (UID, uid)):
                dataset = self.file[key]
                dataset.resize(len(dataset) + 1, axis=0)
                dataset[-1] = value
            self.file.flush()


class ADServer(PVGroup):
    cam = SubGroup(Cam, prefix="cam1:")
    hdf1 = SubGroup(HDF, prefix="HDF1:")


if __name__ == "__main__":
    server = ADServer(sys.argv[1])
    interfaces = os.environ.get("EPICS_CAS_INTF_ADDR_LIST", "127.0.0.1").split()
    run(server.pvdb, interfaces=interfaces, log_pv_names=False)
