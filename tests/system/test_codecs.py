"""NDPluginCodec-compressed NTNDArray frames: every codec and pixel type round trips; chunks
written by hdf5plugin (with the HDF5 filter header) decode unchanged; a bad payload, an
unknown codec, a wrong size or an unsupported pixel type is a FrameError naming the cause."""

import time

import numpy as np
import pytest

from edgeloop import codecs, ntnd
from edgeloop.app.hedm_demo import PeakCollector
from edgeloop.ioc.hedm import add_pseudo_voigt
from tests.kit.answers import Collector, post
from tests.kit.env import SHARED_DATA


@pytest.mark.timeout(120)
def test_the_edge_answers_a_compressed_frame_as_it_answers_it_uncompressed(fed_edge):
    system, source = fed_edge
    p = system.prefix
    frames = np.load(SHARED_DATA / "aps-ptycho-test235.npz")["reciprocal"][:2]  # 512x512
    signal = np.zeros((256, 256))
    for x, y in ((60.3, 80.7), (150.2, 40.1), (200.6, 190.4)):
        add_pseudo_voigt(signal, x, y, 3000.0, 2.0, 2.2, 0.3)
    hedm = np.random.default_rng(2).poisson(30 + signal).astype(np.uint16)
    outputs = Collector(system.ctx, f"{p}edge:Phase")
    peaks = PeakCollector(system.ctx, f"{p}edge:Peaks")
    time.sleep(0.5)  # both subscriptions live before the first frame
    bad = system.value("edge:BadFrames")
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
    outputs = Collector(system.ctx, f"{p}edge:Phase")
    time.sleep(0.5)
    bad, out = system.value("edge:BadFrames"), system.value("edge:FramesOut")
    corrupt = ntnd.build(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), 901, codec="bslz4")
    payload = corrupt["value"].copy()[:40]
    corrupt["value"] = ("ubyteValue", payload)
    corrupt["compressedSize"] = payload.size
    post(source, corrupt)
    post(source, ntnd.build(np.ones((64, 64), np.uint16), 902, {"Mode": "ptycho"}, codec="lz4"))
    system.wait_value("edge:BadFrames", lambda v: v == bad + 1, 10)
    system.wait_value("edge:FramesOut", lambda v: v == out + 1, 10)
    answered = {f.unique_id for f in outputs.wait(2, timeout=10)}  # and the last answer before
    assert 902 in answered and 901 not in answered
    outputs.close()
    # refusals are summarised once per edge.bad_frame_report_s, with an example uniqueId
    system.wait_value("edge:Message", lambda v: "uniqueId 901" in v, 5)
    message = system.pv("edge:Message")
    assert "bslz4" in message["value"]
    assert message["alarm.severity"] == 1
