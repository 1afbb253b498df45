"""NDPluginCodec-compressed NTNDArray frames: every codec and pixel type round trips; chunks
written by hdf5plugin (with the HDF5 filter header) decode unchanged; a bad payload, an
unknown codec, a wrong size or an unsupported pixel type is a FrameError naming the cause;
a decompression bomb is refused within the size its frame declares."""

import tracemalloc
import zlib

import h5py
import hdf5plugin
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgeloop import codecs, ntnd
from edgeloop.app.answers import AnswerCollector, PeakCollector
from edgeloop.ioc.hedm_sim import add_pseudo_voigt
from tests.kit.answers import post
from tests.kit.bombs import GIB, LZ4_MAX, bomb_frame
from tests.kit.env import SHARED_DATA

PIXEL_TYPES = list(codecs.SCALAR_TYPE_CODES)


@settings(max_examples=60, deadline=None)
@given(
    data=hnp.arrays(
        dtype=st.sampled_from(PIXEL_TYPES),
        shape=hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=48),
        elements={"allow_nan": False},
    ),
    codec=st.sampled_from(codecs.CODECS),
)
def test_every_codec_and_pixel_type_round_trips(data, codec):
    frame = ntnd.decode(ntnd.build(data, 7, {"Mode": "hedm"}, codec=codec))
    assert frame.data.dtype == data.dtype and frame.data.shape == data.shape
    np.testing.assert_array_equal(frame.data, data)
    assert frame.unique_id == 7 and frame.attributes["Mode"] == "hedm"


@pytest.mark.parametrize(
    "codec, hdf5_filter",
    [
        ("bslz4", hdf5plugin.Bitshuffle(cname="lz4")),
        ("lz4", hdf5plugin.LZ4()),
        ("lz4", hdf5plugin.LZ4(nbytes=4096)),  # several LZ4 blocks per chunk
    ],
)
def test_hdf5_chunks_with_the_filter_header_decode(tmp_path, codec, hdf5_filter):
    frames = np.random.default_rng(1).poisson(30, (2, 128, 96)).astype(np.uint16)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("data", data=frames, chunks=(1, 128, 96), **hdf5_filter)
    with h5py.File(tmp_path / "f.h5") as f:
        _, chunk = f["data"].id.read_direct_chunk((1, 0, 0))
    payload = np.frombuffer(chunk, np.uint8)
    out = codecs.decompress(codec, payload, np.dtype(np.uint16), frames[1].nbytes)
    np.testing.assert_array_equal(out.reshape(128, 96), frames[1])


def _compressed(codec="bslz4", dtype=np.uint16):
    return ntnd.build(np.arange(64 * 64, dtype=dtype).reshape(64, 64), 3, codec=codec)


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_a_corrupt_payload_is_a_bad_frame(codec):
    value = _compressed(codec)
    payload = value["value"].copy()
    payload[: min(8, payload.size)] ^= 0xFF
    payload = payload[: payload.size // 2]
    value["value"] = ("ubyteValue", payload)
    value["compressedSize"] = payload.size
    with pytest.raises(ntnd.FrameError, match=f"{codec} payload|uncompressedSize|decompressed"):
        ntnd.decode(value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"codec.name": "jpeg"}, "unknown codec 'jpeg'"),
        ({"uncompressedSize": 64 * 64 * 2 + 2}, "decompressed to 8192 bytes|does not decompress"),
        ({"uncompressedSize": 64 * 64 * 2 + 1}, "not a whole number"),
        ({"compressedSize": 5}, "compressedSize 5 but"),
        ({"codec.parameters": 4}, "pixel type code 4"),  # int64: not a detector pixel type
        ({"codec.parameters": "uint16"}, "pixel type code 'uint16'"),
    ],
)
def test_declared_sizes_codec_and_pixel_type_are_checked(change, message):
    value = _compressed()
    for key, v in change.items():
        value[key] = v
    with pytest.raises(ntnd.FrameError, match=message):
        ntnd.decode(value)


def test_colour_and_64_bit_frames_are_refused_with_the_reason():
    value = ntnd.build(np.zeros((4, 6), np.uint8), 1, {"ColorMode": 2})
    value["dimension"] = [{"size": 3}, {"size": 2}, {"size": 4}]
    with pytest.raises(ntnd.FrameError, match=r"colour frames .*ColorMode 2"):
        ntnd.decode(value)
    value = ntnd.build(np.zeros((4, 6), np.int64), 1)
    with pytest.raises(ntnd.FrameError, match="pixel type int64 is not supported"):
        ntnd.decode(value)


@pytest.mark.timeout(120)
def test_the_edge_answers_a_compressed_frame_as_it_answers_it_uncompressed(fed_edge):
    system, source = fed_edge
    p = system.prefix
    frames = np.load(SHARED_DATA / "aps-ptycho-test235.npz")["reciprocal"][:2]  # 512x512
    signal = np.zeros((256, 256))
    for x, y in ((60.3, 80.7), (150.2, 40.1), (200.6, 190.4)):
        add_pseudo_voigt(signal, x, y, 3000.0, 2.0, 2.2, 0.3)
    hedm = np.random.default_rng(2).poisson(30 + signal).astype(np.uint16)
    outputs = AnswerCollector(system.ctx, f"{p}edge:Phase")
    peaks = PeakCollector(system.ctx, f"{p}edge:Peaks")
    outputs.wait_connected(), peaks.wait_connected()  # both live before the first frame
    bad = system.settled()["BadFrames"]
    uid, answers = 0, {}
    for frame in (*frames, frames[0].astype(np.float32)):
        for codec in ("", *codecs.CODECS):  # one at a time: each frame its own batch
            uid += 1
            post(source, ntnd.build(frame, uid, {"Mode": "ptycho"}, codec=codec))
            got = {f.unique_id: f for f in outputs.wait(uid, timeout=30)}
            answers[uid] = got[uid].data
    outputs.close()
    for first in range(1, uid + 1, 1 + len(codecs.CODECS)):
        for k in range(1, 1 + len(codecs.CODECS)):
            np.testing.assert_allclose(answers[first + k], answers[first], atol=1e-5)
    for codec in ("", "bslz4"):
        uid += 1
        post(source, ntnd.build(hedm, uid, {"Mode": "hedm"}, codec=codec))
    tables = peaks.take([uid - 1, uid], 30)
    peaks.close()
    assert len(tables[uid]["x"]) == 3
    for column in ("x", "y", "intensity"):
        np.testing.assert_array_equal(tables[uid - 1][column], tables[uid][column])
    assert system.value("edge:BadFrames") == bad


@pytest.mark.timeout(120)
def test_a_corrupt_compressed_frame_is_counted_named_and_the_next_is_answered(fed_edge):
    system, source = fed_edge
    p = system.prefix
    outputs = AnswerCollector(system.ctx, f"{p}edge:Phase").wait_connected()
    before = system.settled()
    bad, out = before["BadFrames"], before["FramesOut"]
    corrupt = ntnd.build(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), 901, codec="bslz4")
    payload = corrupt["value"].copy()[:40]
    corrupt["value"] = ("ubyteValue", payload)
    corrupt["compressedSize"] = payload.size
    post(source, corrupt)
    post(source, ntnd.build(np.ones((64, 64), np.uint16), 902, {"Mode": "ptycho"}, codec="lz4"))
    system.wait_value("edge:BadFrames", lambda v: v == bad + 1, 10)
    system.wait_value("edge:FramesOut", lambda v: v == out + 1, 10)
    answered = {f.unique_id for f in outputs.wait(2, timeout=30)}  # and the last answer before
    assert 902 in answered and 901 not in answered
    outputs.close()
    # refusals are summarised once per edge.bad_frame_report_s, with an example uniqueId
    system.wait_value("edge:Message", lambda v: "uniqueId 901" in v, 5)
    message = system.pv("edge:Message")
    assert "bslz4" in message["value"]
    assert message["alarm.severity"] == 1


# decompression bombs: what each codec would expand them to (LZ4 blocks and blosc frames
# cannot describe more than about 2 GiB)
BOMBS = {"zlib": 2 * GIB, "lz4": LZ4_MAX, "blosc": 2 * GIB - 64}


@pytest.mark.parametrize("codec", list(BOMBS))
def test_a_decompression_bomb_is_refused_within_the_size_it_declares(codec):
    value = bomb_frame(codec, BOMBS[codec], 5)
    assert value["value"].nbytes < 10 << 20  # a few MB that would expand to ~2 GiB
    tracemalloc.start()
    try:
        with pytest.raises(ntnd.FrameError, match=f"{codec} payload|blosc header"):
            ntnd.decode(value, max_bytes=16 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{codec}: decoding the refused bomb allocated {peak} bytes"


@pytest.mark.parametrize("codec", list(BOMBS))
def test_a_bomb_that_declares_its_size_is_refused_before_decoding(codec):
    value = bomb_frame(codec, BOMBS[codec], 6, declared=BOMBS[codec])
    with pytest.raises(ntnd.FrameError, match=f"above the limit of {16 << 20}"):
        ntnd.decode(value, max_bytes=16 << 20)
    with pytest.raises(codecs.CodecError, match="above the limit"):
        codecs.decompress(codec, value["value"], np.dtype(np.uint8), BOMBS[codec], 16 << 20)


def test_zlib_streams_that_end_early_or_run_long_are_refused():
    data = np.arange(4096, dtype=np.uint16)
    raw = np.frombuffer(zlib.compress(data.tobytes()), np.uint8)
    with pytest.raises(codecs.CodecError, match="ends before its stream"):
        codecs.decompress("zlib", raw[:-8], np.dtype(np.uint16), data.nbytes)
    with pytest.raises(codecs.CodecError, match="more than uncompressedSize 8190"):
        codecs.decompress("zlib", raw, np.dtype(np.uint16), data.nbytes - 2)
    out = codecs.decompress("zlib", raw, np.dtype(np.uint16), data.nbytes)
    np.testing.assert_array_equal(out, data)
