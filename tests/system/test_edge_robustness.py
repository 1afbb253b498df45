"""No frame content stops the edge: a running edge server (its own process) is fed, through
a real PVA server this test owns, every kind of bad frame between good ones, and thousands
of random malformed NTNDArrays (hypothesis).  Each bad frame is counted once, the good ones
are all answered, the counts add up, and refusals are summarised, not logged per frame."""

import re
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from p4p import Type, Value
from p4p.server import Server
from p4p.server.thread import SharedPV

from edgeloop import ntnd
from edgeloop.app.answers import AnswerCollector
from edgeloop.waiting import wait_until
from tests.kit.answers import post
from tests.kit.env import random_prefix
from tests.kit.servers import System, small_config

pytestmark = [pytest.mark.timeout(600)]


MAX_FRAME_BYTES = 1 << 20
MAX_PEAKS = 50


class Source:
    """The edge's input: a SharedPV this test owns, re-typed when a test sends a structure
    that is not an NTNDArray."""

    def __init__(self, name: str):
        self.name = name
        self.pv = SharedPV()
        self.server = Server(providers=[{name: self.pv}])
        self.uid = 0

    def send(self, value: Value) -> None:
        if self.pv.isOpen() and value.getID() != self.pv.current().getID():
            self.pv.close()
        post(self.pv, value)

    def frame(self, data=None, uid=None, **attrs) -> int:
        """Post a frame (a fresh uniqueId unless given); returns its uniqueId."""
        if uid is None:
            self.uid += 1
            uid = self.uid
        data = np.ones((64, 64), np.uint16) if data is None else data
        self.send(ntnd.build(data, uid, attrs))
        return uid

    def stop(self):
        self.server.stop()


@pytest.fixture(scope="module")
def edge(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("robust")
    cfg, path = small_config(tmp, random_prefix("r"))
    cfg.edge.max_frame_bytes = MAX_FRAME_BYTES
    cfg.edge.max_peaks_per_frame = MAX_PEAKS
    cfg.dump(path)
    source = Source(f"{cfg.prefix}src:Image")
    sys_ = System(cfg, path, tmp / "logs")
    try:
        sys_.start("edge", "--input-pv", source.name, ready_pv="edge:ModelVersion")
        yield sys_, source
    finally:
        sys_.stop()
        source.stop()
        if request.session.testsfailed:
            print(sys_.outputs())


def settled(system, frames_in: int) -> dict:
    """The counts once FramesIn reached ``frames_in`` and nothing is in flight."""
    return system.settled(lambda c: c["FramesIn"] >= frames_in and c["InFlight"] == 0, 0.3)


def _colour(uid):
    v = ntnd.build(np.ones((4, 4), np.uint8), uid)
    v["dimension"] = [{"size": 3}, {"size": 4}, {"size": 4}]
    v["value"] = ("ubyteValue", np.ones(48, np.uint8))
    return v


def _declared(uid, dims):
    v = ntnd.build(np.ones((8, 8), np.uint16), uid)
    v["dimension"] = [{"size": d} for d in dims]
    return v


def _corrupt_lz4(uid):
    v = ntnd.build(np.arange(4096, dtype=np.uint16).reshape(64, 64), uid, codec="lz4")
    payload = v["value"].copy()
    payload[4:] = 0xFF
    v["value"] = ("ubyteValue", payload)
    return v


def bad_frames():
    """(name, value) of frames the edge must refuse."""
    nan = np.ones((64, 64), np.float32)
    nan[3, 4] = np.nan
    inf = np.ones((64, 64), np.float64)
    inf[0, 0] = -np.inf
    made = [
        ("Mode is an array", ntnd.build(np.ones((64, 64), np.uint16), 0, {"Mode": np.arange(3)})),
        ("Mode is a number", ntnd.build(np.ones((64, 64), np.uint16), 0, {"Mode": 3})),
        ("Mode unknown", ntnd.build(np.ones((64, 64), np.uint16), 0, {"Mode": "xrf"})),
        ("colour", _colour(0)),
        ("1-D", _declared(0, [64])),
        ("declared size wrong", _declared(0, [9, 8])),
        ("empty", ntnd.build(np.ones((8, 8), np.uint8), 0)),
        ("bool pixels", ntnd.build(np.ones((8, 8), bool), 0)),
        ("int64 pixels", ntnd.build(np.ones((8, 8), np.int64), 0)),
        ("uint64 pixels", ntnd.build(np.ones((8, 8), np.uint64), 0)),
        ("NaN", ntnd.build(nan, 0)),
        ("Inf", ntnd.build(inf, 0)),
        ("too many bytes", ntnd.build(np.ones((1024, 1024), np.uint16), 0)),
        ("too many padded", ntnd.build(np.ones((1, 200_000), np.uint8), 0)),
        ("corrupt lz4", _corrupt_lz4(0)),
    ]
    made[6][1]["value"] = ("ubyteValue", np.zeros(0, np.uint8))
    made[6][1]["dimension"] = [{"size": 0}, {"size": 0}]
    return made


def test_every_kind_of_bad_frame_is_refused_once_and_good_frames_between_are_answered(edge):
    system, source = edge
    phase = AnswerCollector(system.ctx, f"{system.prefix}edge:Phase")
    before = system.counts()
    good = []
    t0 = time.monotonic()
    for _, value in bad_frames():
        source.uid += 1
        value["uniqueId"] = source.uid
        source.send(value)
        good.append(source.frame())  # the next valid frame is answered
        time.sleep(0.05)
    n_bad = len(good)
    # answered, with a caveat: positions that are not numbers are not stitched
    good.append(source.frame(SampleX="left", SampleY=np.arange(2)))
    good.append(source.frame(Mode="ptycho", Extra=np.zeros((2, 2)).ravel(), SampleX=0.0))
    c = settled(system, before["FramesIn"] + n_bad + len(good))
    frames = phase.wait(len(good), 30)
    phase.close()
    assert sorted(f.unique_id for f in frames if f.unique_id in good) == good
    assert c["BadFrames"] - before["BadFrames"] == n_bad
    assert c["FramesOut"] - before["FramesOut"] == len(good)
    assert c["FramesIn"] == c["FramesOut"] + c["Dropped"] + c["BadFrames"]

    # one summary per second, not a line per frame, the last one a second after the last;
    # the caveats of the last two frames can come in a summary of their own
    def all_logged():
        log = system.procs["edge"].output()
        found = re.findall(r"(\d+) frame\(s\) refused in the last", log)
        return sum(map(int, found)) == c["BadFrames"] and "not stitched" in log and found

    summaries = wait_until(all_logged, 30, "the edge's summaries of refused frames", 0.1)
    log = system.procs["edge"].output()
    assert len(summaries) <= time.monotonic() - t0 + 1 and len(summaries) < n_bad
    assert "NaN/Inf pixels" in log and "max_frame_bytes" in log and "not stitched" in log
    assert system.procs["edge"].alive()


def test_repeated_and_out_of_order_unique_ids_are_answered_once(edge):
    system, source = edge
    before = system.counts()
    phase = AnswerCollector(system.ctx, f"{system.prefix}edge:Phase")
    base = source.uid
    for uid in (base + 1, base + 1, base + 4, base + 3, base + 2, base + 4):
        source.frame(uid=uid)
        time.sleep(0.02)
    source.uid = base + 4
    c = settled(system, before["FramesIn"] + 4)
    frames = phase.wait(4, 20)
    phase.close()
    answered = [f.unique_id for f in frames if f.unique_id > base]
    assert sorted(answered) == [base + 1, base + 2, base + 3, base + 4]
    assert c["Repeats"] - before["Repeats"] == 2
    assert c["MissedFrames"] == before["MissedFrames"]  # 2 and 3 came late, not lost


def test_a_structure_that_is_not_an_ntndarray_is_counted_and_the_edge_goes_on(edge):
    system, source = edge
    before = system.counts()
    source.send(Value(Type([("uniqueId", "s"), ("value", "ad")]), {"uniqueId": "x"}))
    system.wait_value("edge:BadFrames", lambda v: v == before["BadFrames"] + 1, 20)
    uid = source.frame()
    system.wait_value("edge:FramesOut", lambda v: v == before["FramesOut"] + 1, 20)
    assert system.pv("edge:Phase")["uniqueId"] == uid


def test_a_flood_of_light_is_answered_with_the_peaks_capped_and_flagged(edge):
    system, source = edge
    before = system.counts()
    rng = np.random.default_rng(3)
    flood = rng.poisson(20.0, (256, 256)).astype(np.uint16)
    tops = rng.integers(5000, 60000, flood[::5, ::5].shape)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):  # 2x2 spots every 5 pixels
        flood[dy::5, dx::5] = tops[: len(range(dy, 256, 5)), : len(range(dx, 256, 5))] - dy
    uid = source.frame(flood, Mode="hedm")
    settled(system, before["FramesIn"] + 1)
    table = system.pv("edge:Peaks")
    assert table["timeStamp.userTag"] == uid
    assert len(table["value.x"]) <= MAX_PEAKS
    assert table["alarm.severity"] == 1 and "left out" in table["alarm.message"]
    source.frame(Mode="ptycho")
    settled(system, before["FramesIn"] + 2)  # the next test starts from settled counts


MEMBERS = sorted(ntnd._CODE2UNION.items())


@st.composite
def frames(draw):
    """(NTNDArray, answered?) — a valid frame, or one with a known defect, with random
    attributes around it either way."""
    extra = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["SampleX", "SampleY", "ColorMode", "Gain", "Note"]),
                st.one_of(
                    st.integers(-(2**31), 2**31 - 1),
                    st.floats(),
                    st.text(max_size=6),
                    st.lists(st.integers(-9, 9), min_size=1, max_size=4).map(np.array),
                ),
            ),
            max_size=3,
        )
    )
    shape = draw(st.tuples(st.integers(1, 80), st.integers(1, 80)))
    dtype = draw(st.sampled_from(["u1", "u2", "u4", "i1", "i2", "i4", "f4", "f8"]))
    data = np.ones(shape, dtype)
    defect = draw(
        st.sampled_from(
            [None, None, None, "mode", "nan", "dims", "rank", "codec", "pixels", "union"]
        )
    )
    attrs = dict(extra)
    if defect == "mode":
        attrs["Mode"] = draw(st.one_of(st.text(max_size=5), st.integers(), st.floats()))
    elif draw(st.booleans()):
        attrs["Mode"] = "ptycho"
    if defect == "nan":
        data = data.astype(np.float32)
        data.flat[draw(st.integers(0, data.size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf])
        )
    codec = draw(st.sampled_from(["", "", "lz4", "bslz4", "zlib"])) if defect != "nan" else ""
    value = ntnd.build(data, 1, attrs, codec=codec)
    if defect == "dims":
        value["dimension"] = [{"size": shape[1] + 1}, {"size": shape[0]}]
    elif defect == "rank":
        value["dimension"] = [{"size": data.size}]
    elif defect == "codec":
        value["codec.name"] = draw(st.sampled_from(["jpeg", "bzip2", "lz5"]))
    elif defect == "pixels":
        code = draw(st.sampled_from(["?", "l", "L"]))
        value["value"] = (ntnd._CODE2UNION[code], np.ones(data.size, code))
        value["codec.name"] = ""
    elif defect == "union":  # a few bytes: never a valid payload for the declared frame
        codec = draw(st.sampled_from(["lz4", "bslz4", "blosc", ""]))
        n = draw(st.integers(0, 7)) + (data.size + 1 if codec == "" else 0)
        value["value"] = ("ubyteValue", np.zeros(n, np.uint8))
        value["codec.name"] = codec
    if defect == "mode" and attrs["Mode"] in ("ptycho", "hedm"):
        defect = None
    return value, defect is None


# the unit tier fuzzes the frame path in process (400 examples); here the transport and
# a real client's frames are the point
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
@given(batch=st.lists(frames(), min_size=1, max_size=20))
def test_fuzz_random_malformed_frames_through_a_real_pva_client(edge, batch):
    system, source = edge
    before = system.counts()
    expected_out = 0
    for value, answered in batch:
        source.uid += 1
        value["uniqueId"] = source.uid
        source.send(value)
        expected_out += answered
    c = settled(system, before["FramesIn"] + len(batch))
    assert system.procs["edge"].alive()
    assert c["FramesIn"] - before["FramesIn"] == len(batch)
    assert c["FramesOut"] - before["FramesOut"] == expected_out, c
    assert c["BadFrames"] - before["BadFrames"] == len(batch) - expected_out, c
    assert c["Dropped"] == before["Dropped"]


def test_a_worker_thread_that_dies_is_reported_and_restarted_one_that_keeps_dying_stops_it(
    tmp_path,
):
    """In process, so the fault can be injected: the inference thread's queue read raises."""
    import threading

    from p4p.client.thread import Context

    from edgeloop.edge_pva.server import EdgeServer

    cfg, _ = small_config(tmp_path, random_prefix("d"))
    source = Source(f"{cfg.prefix}src:Image")
    edge = EdgeServer(cfg, input_pv=source.name)
    real_get = edge.queue.get_batch
    faults = {"left": 1}

    def failing_get(*args, **kwargs):
        if faults["left"]:
            faults["left"] -= 1
            raise RuntimeError("injected fault")
        return real_get(*args, **kwargs)

    edge.queue.get_batch = failing_get
    ctx = Context("pva", nt=False)
    exits = []

    def serve():
        try:
            edge.serve_forever()
        except SystemExit as exc:
            exits.append(str(exc))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        p = cfg.prefix
        deadline = time.monotonic() + 20
        while ctx.get(f"{p}edge:Restarts", timeout=5)["value"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        restarts = ctx.get(f"{p}edge:Restarts")
        assert restarts["alarm.severity"] == 2
        uid = source.frame()
        while ctx.get(f"{p}edge:FramesOut")["value"] < 1:  # the restarted thread answers
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert ctx.get(f"{p}edge:Phase")["uniqueId"] == uid
        # a fault while a frame is in hand: the frame is counted, as bad, before the thread dies
        real_set_mode = edge._set_mode

        def failing_set_mode(mode):
            edge._set_mode = real_set_mode
            raise RuntimeError("injected fault in the middle of a batch")

        edge._set_mode = failing_set_mode
        source.frame()
        while ctx.get(f"{p}edge:Restarts")["value"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        counts = edge.queue.counts()
        assert counts["bad"] == 1 and counts["in_flight"] == 0, counts
        faults["left"] = 10**6  # now it dies on every try
        thread.join(30)
        assert not thread.is_alive()
        assert exits and "died 5 times" in exits[0]
    finally:
        faults["left"] = 0
        edge.stop()
        thread.join(10)
        ctx.close()
        source.stop()


SOURCE_SCRIPT = """
import sys, time
import numpy as np
from p4p.server import Server
from p4p.server.thread import SharedPV
from edgeloop import ntnd
name, uid = sys.argv[1], int(sys.argv[2])
pv = SharedPV(initial=ntnd.build(np.ones((64, 64), np.uint16), uid))
with Server(providers=[{name: pv}]):
    print("serving", flush=True)
    while True:
        time.sleep(0.05)
        uid += 1
        pv.post(ntnd.build(np.ones((64, 64), np.uint16), uid))
"""


def test_a_frame_source_killed_and_restarted_mid_scan_is_followed_and_the_gap_reported(edge):
    import os
    import signal
    import subprocess
    import sys

    from tests.kit.env import TEST_ENV
    from tests.kit.waiting import wait_process_gone

    system, _ = edge
    name = f"{system.prefix}killable:Image"
    before = system.counts()

    def start(first_uid):
        proc = subprocess.Popen(
            [sys.executable, "-c", SOURCE_SCRIPT, name, str(first_uid)],
            env=dict(os.environ, **TEST_ENV),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "serving"
        return proc

    # a second edge on this source, so the module's edge keeps its own input
    from edgeloop.app.processes import ManagedProcess, wait_for_pv

    first = start(1)
    watcher = ManagedProcess(
        "edge",
        [
            "edge",
            "--prefix",
            f"{system.prefix}k",
            "--config",
            str(system.config_path),
            "--input-pv",
            name,
        ],
        system.logs / "edge-k.log",
        env=system.env,
    )
    p = f"{system.prefix}kedge:"
    try:
        wait_for_pv(system.ctx, f"{p}ModelVersion", 90, watcher)
        system.wait_value("kedge:FramesOut", lambda v: v >= 5, 60)
        os.kill(first.pid, signal.SIGKILL)
        assert wait_process_gone(first.pid)
        first.wait(5)
        system.wait_value("kedge:Message", lambda v: "disconnected" in v, 20)
        assert system.ctx.get(f"{p}Message")["alarm.severity"] == 1
        out = system.value("kedge:FramesOut")
        last = system.pv("kedge:Phase")["uniqueId"]
        missed = system.value("kedge:MissedFrames")
        phase = AnswerCollector(system.ctx, f"{p}Phase")
        second = start(1000)  # the restarted source goes on numbering, 1000 onwards
        try:
            system.wait_value("kedge:FramesOut", lambda v: v >= out + 5, 60)
            message = system.ctx.get(f"{p}Message")
            assert "back after" in message["value"] and message["alarm.severity"] == 0
            resumed = min(f.unique_id for f in phase.wait(5) if f.unique_id >= 1000)
            # the last answered before the kill was `last`, the first after it `resumed`;
            # MissedFrames is published every stats_publish_s
            gap = resumed - last - 1
            system.wait_value("kedge:MissedFrames", lambda v: v - missed == gap, 10)
        finally:
            phase.close()
            second.kill()
            second.wait(5)
    finally:
        first.kill()
        first.wait(5)
        watcher.stop()
    assert system.counts()["FramesIn"] == before["FramesIn"]  # the other edge saw none
