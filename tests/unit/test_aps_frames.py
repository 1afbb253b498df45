"""Real APS diffraction frames (512x512 int32), streamed as NTNDArray from a p4p server the
test owns, are each answered by the edge server; malformed frames are counted, reported,
and do not stop the stream."""

import time

import numpy as np
import pytest

from edgeloop import ntnd
from edgeloop.app.answers import AnswerCollector
from tests.kit.answers import post
from tests.kit.env import SHARED_DATA

pytestmark = [pytest.mark.timeout(300)]
APS = SHARED_DATA / "aps-ptycho-test235.npz"


@pytest.fixture(scope="module")
def aps_edge(fed_edge):
    if not APS.exists():
        pytest.fail(f"{APS} is missing (the shared data folder sits beside the project)")
    return fed_edge


def test_each_real_aps_frame_gets_a_phase_image(aps_edge):
    system, source = aps_edge
    data = np.load(APS)
    frames, positions = data["reciprocal"], data["position"]
    assert frames.shape == (20, 512, 512) and frames.dtype == np.int32
    out = AnswerCollector(system.ctx, f"{system.prefix}edge:Phase").wait_connected()
    for i, frame in enumerate(frames):
        y, x = positions[i] * 1e6  # metres -> um
        post(source, ntnd.build(frame, i + 1, {"SampleX": x, "SampleY": y}))
        time.sleep(0.01)
    got = out.wait_ids(range(1, 21))
    out.close()
    assert sorted(got) == list(range(1, 21))
    for f in got.values():
        assert f.data.shape == (64, 64) and np.all(np.isfinite(f.data))
    system.wait_value("edge:FramesOut", lambda v: v >= 20, 10)
    assert system.value("edge:Dropped") == 0


def test_malformed_frames_are_reported_and_the_stream_continues(aps_edge):
    system, source = aps_edge
    before = system.settled()
    bad_before, out_before = before["BadFrames"], before["FramesOut"]
    bad = ntnd.build(np.ones((8, 8), np.int32), 101)
    bad["dimension"] = [
        {"size": 9, "offset": 0, "fullSize": 9, "binning": 1, "reverse": False},
        {"size": 8, "offset": 0, "fullSize": 8, "binning": 1, "reverse": False},
    ]
    post(source, bad)
    coded = ntnd.build(np.ones((8, 8), np.int32), 102)
    coded["codec.name"] = "blosc"
    post(source, coded)
    system.wait_value("edge:BadFrames", lambda v: v >= bad_before + 2, 10)
    system.wait_value("edge:Message", lambda m: "blosc" in m or "does not match" in m, 10)
    assert system.pv("edge:Message")["alarm.severity"] >= 1
    post(source, ntnd.build(np.ones((64, 64), np.int32), 103))
    system.wait_value("edge:FramesOut", lambda v: v >= out_before + 1, 10)
