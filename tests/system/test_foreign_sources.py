"""The edge against a frame source it did not write: pvapy's ``pvapy-ad-sim-server`` (a
pvDatabase server, the server library areaDetector's NDPluginPva uses), streaming random
frames of every pixel type, and compressed chunks straight out of HDF5 files written with
hdf5plugin (``-hcm``: the chunks keep the HDF5 filter header).  Each frame is answered once,
and the answer to a compressed frame equals the answer to the same frame uncompressed."""

from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
from p4p.client.thread import Context

from edgeloop.app.answers import AnswerCollector
from edgeloop.app.loop import settled_counts
from edgeloop.config import Config
from edgeloop.edge_pva.server import EdgeServer
from edgeloop.frame_ids import FrameIds
from edgeloop.waiting import wait_settled
from tests.kit.env import random_prefix
from tests.kit.pvapy_sources import Witness, ad_sim_server

pytestmark = [pytest.mark.timeout(300)]


PIXEL_TYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "float32", "float64")


@pytest.fixture
def run(tmp_path):
    """Stream from a pvapy-ad-sim-server into a new edge server (in this process) and report
    what a witness monitor saw sent, what the edge answered and its counters."""
    cfg = Config(
        prefix=random_prefix("a"),
        data_dir=str(tmp_path / "data"),
        registry_dir=str(tmp_path / "models"),
    )
    cfg.edge.stats_publish_s = 0.1
    ctx = Context("pva", nt=False)
    runs = []

    def stream(*args: str, **kwargs) -> tuple[set, dict, dict]:
        while True:  # until the edge and both monitors were up before the first frame
            channel = f"{cfg.prefix}src{len(runs)}:Image"
            with ad_sim_server(channel, *args, **kwargs) as source:
                edge = EdgeServer(cfg, input_pv=channel).start()
                runs.append(edge)
                outputs = AnswerCollector(ctx, f"{cfg.prefix}edge:Phase")
                witness = Witness(ctx, channel)
                ready = (lambda e=edge: e.input_connected, outputs.connected.is_set)
                in_time = source.before_first_frame(ctx, *ready, witness.connected.is_set)
                if not in_time:
                    assert len(runs) < 6, "the source never waited for the edge to connect"
                    source.abandon()
                    outputs.close()
                    witness.close()
                    edge.stop()
                    kwargs["start_delay"] = 2 * kwargs.get("start_delay", 5.0)
            if in_time:
                break
        counts = drained(ctx, cfg.prefix)
        sent = witness.sent()
        witness.close()
        answers = {f.unique_id: f.data for f in outputs.wait(len(sent), timeout=30)}
        outputs.close()
        edge.stop()
        return sent, answers, counts

    try:
        yield stream
    finally:
        ctx.close()
        for edge in runs:
            edge.stop()


def drained(ctx: Context, p: str, timeout: float = 30) -> dict:
    """The counters once they add up with nothing in flight and stopped moving."""
    return settled_counts(ctx, p, quiet_s=0.5, timeout=timeout)


@pytest.mark.parametrize("dtype", PIXEL_TYPES)
def test_every_pixel_type_from_pvapy_is_answered_once(run, dtype):
    sent, answers, counts = run("-nx", "64", "-ny", "64", "-dt", dtype, "-nf", "10")
    assert len(sent) >= 90  # 2 s at 50 frames/s
    assert sorted(answers) == sorted(sent)  # each frame once
    assert counts["FramesIn"] == counts["FramesOut"] == len(sent), counts
    assert counts["BadFrames"] == counts["Dropped"] == counts["Repeats"] == 0, counts
    assert counts["MissedFrames"] == 0, counts
    for image in answers.values():
        assert image.shape == (64, 64) and np.all(np.isfinite(image))


def test_repeats_a_pipelined_monitor_gets_from_pvdatabase_are_recognised():
    """With record[pipeline=true] a pvDatabase server sends frames many times over; the
    edge's FrameIds keeps one of each (the edge's own request avoids them altogether)."""
    channel = f"{random_prefix('p')}pipe:Image"
    ids, updates = FrameIds(), []

    def on(value):
        if not isinstance(value, Exception) and value["uniqueId"]:
            ts = value["timeStamp"]
            updates.append(value["uniqueId"])
            ids.arrival(value["uniqueId"], (ts["secondsPastEpoch"], ts["nanoseconds"]))

    ctx = Context("pva", nt=False)
    try:
        with ad_sim_server(channel, "-nx", "32", "-ny", "32", fps=100):
            request = "field(uniqueId,timeStamp)record[pipeline=true,queueSize=32]"
            sub = ctx.monitor(channel, on, request=request)
            witness = Witness(ctx, channel)
        # the server is gone: what it sent before is received once the count stops moving
        wait_settled(lambda: len(updates), lambda n: True, 0.5, 10, "the last updates")
        sub.close()
        witness.close()
    finally:
        ctx.close()
    distinct, sent = len(set(updates)), len(witness.sent())
    assert sent >= 190 and sent - 2 <= distinct <= sent  # the last may not make it out
    assert len(updates) > distinct  # the server repeated frames to this request
    assert ids.repeats == len(updates) - distinct


def _hdf5_frames(path: Path, hdf5_filter: dict) -> np.ndarray:
    """Ten 64x64 uint16 diffraction-like frames written as areaDetector's HDF5 plugin would,
    one frame per chunk, compressed by an hdf5plugin filter."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[-32:32, -32:32]
    rings = 400 * np.exp(-((np.hypot(yy, xx) % 9) ** 2) / 4)
    frames = rng.poisson(rings + 5, (10, 64, 64)).astype(np.uint16)
    with h5py.File(path, "w") as f:
        f.create_dataset("/entry/data/data", data=frames, chunks=(1, 64, 64), **hdf5_filter)
    return frames


@pytest.mark.parametrize(
    "hdf5_filter",
    [hdf5plugin.Bitshuffle(cname="lz4"), hdf5plugin.LZ4()],
    ids=["bslz4", "lz4"],
)
def test_compressed_hdf5_chunks_give_the_answers_of_the_raw_frames(run, tmp_path, hdf5_filter):
    path = tmp_path / "frames.h5"
    _hdf5_frames(path, hdf5_filter)
    answers = {}
    for how, args in (("compressed", ["-hcm"]), ("raw", [])):
        # -hcm: the chunks as stored, HDF5 filter header and all; else the server
        # decompresses them and sends plain frames
        sent, got, counts = run("-if", str(path), "-hds", "/entry/data/data", *args, fps=20)
        assert sorted(got) == sorted(sent) and len(sent) >= 30, how
        assert counts["BadFrames"] == 0 and counts["FramesOut"] == len(sent), (how, counts)
        answers[how] = {(uid - 1) % 10: image for uid, image in got.items()}  # frame index
    assert sorted(answers["compressed"]) == sorted(answers["raw"]) == list(range(10))
    for i in range(10):
        np.testing.assert_allclose(answers["compressed"][i], answers["raw"][i], atol=1e-5)
