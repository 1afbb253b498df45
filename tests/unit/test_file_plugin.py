"""The simulated NDFileHDF5 in process, as ADCore's NDPluginFile decides: with LazyOpen Yes
(latched at Capture, as ophyd-async leaves it) a Stream capture starts before any frame and
opens its file at the first one; with LazyOpen No it needs a frame first."""

import asyncio

import h5py
import numpy as np

from edgeloop.ioc.areadetector import NDArray
from edgeloop.ioc.hdf_plugin import NDFileHDF5


def frame(uid: int) -> NDArray:
    return NDArray(np.full((8, 8), uid, np.uint16), uid, 1.7e9 + uid, {"SampleX": 0.5 * uid})


async def configure(hdf: NDFileHDF5, folder, lazy: str) -> None:
    await hdf.enable.setpoint.write("Enable")
    await hdf.file_path.setpoint.write(f"{folder}/")
    await hdf.file_name.setpoint.write("run")
    await hdf.file_template.setpoint.write("%s%s.h5")
    await hdf.file_write_mode.setpoint.write("Stream")
    await hdf.num_capture.setpoint.write(0)
    await hdf.lazy_open.setpoint.write(lazy)


def test_a_lazy_stream_opens_its_file_at_the_first_frame(tmp_path):
    async def scenario():
        hdf = NDFileHDF5("T:HDF1:")
        hdf.root = tmp_path
        await configure(hdf, tmp_path, "Yes")
        await hdf.capture.write("Capture")
        started = (hdf.capture_rbv.value, hdf.write_message.value, hdf.full_file_name.value)
        number_before = hdf.file_number.setpoint.value
        for uid in (1, 2, 3):
            await hdf.process(frame(uid))
        await hdf.capture.write("Done")
        return hdf, started, number_before

    hdf, started, number_before = asyncio.run(scenario())
    assert started == ("Capturing", "Lazy Open...", "")  # capturing, no file yet
    assert hdf.file_number.setpoint.value == number_before + 1  # incremented at the open
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["entry/data/data"].shape == (3, 8, 8)
        assert list(f["entry/instrument/NDAttributes/NDArrayUniqueId"]) == [1, 2, 3]
    assert hdf.num_captured.value == 3 and hdf.write_status.value == "Write OK"


def test_without_lazy_open_a_stream_needs_a_frame_first(tmp_path):
    async def scenario():
        hdf = NDFileHDF5("T:HDF1:")
        hdf.root = tmp_path
        await configure(hdf, tmp_path, "No")
        await hdf.capture.write("Capture")
        refused = (hdf.capture.value, hdf.write_status.value, hdf.write_message.value)
        await hdf.process(frame(1))
        await hdf.capture.write("Capture")  # primed: the file opens at Capture
        opened = hdf.full_file_name.value
        await hdf.capture.write("Done")
        return refused, opened

    (capture, status, message), opened = asyncio.run(scenario())
    assert (capture, status) == ("Done", "Write error") and "must collect an array" in message
    assert opened == f"{tmp_path}/run.h5"
