"""The edge's bookkeeping on its own: uniqueId arrivals (repeats, gaps, late frames,
restarts), the frame account that always adds up, supervised threads, the bounded peak
finder, and the NTNDArray decoder that refuses anything with one error type."""

import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from p4p import Type, Value

from edgeloop import ntnd
from edgeloop.edge_pva.frame_queue import FrameQueue
from edgeloop.edge_pva.supervise import Supervisor
from edgeloop.frame_ids import AcquisitionOrder, Arrival, FrameIds
from edgeloop.peaks import find_peaks
from edgeloop.waiting import wait_until


def test_arrivals_repeats_gaps_late_frames_and_restarts():
    ids = FrameIds()
    seq = [(1, (0, 1)), (2, (0, 2)), (2, (0, 2)), (2, (0, 9)), (5, (0, 5)), (4, (0, 4))]
    verdicts = [ids.arrival(uid, stamp) for uid, stamp in seq]
    assert verdicts == [
        Arrival.NEW,
        Arrival.NEW,
        Arrival.REPEAT,  # the same frame again
        Arrival.REPEAT,  # the same uniqueId with another stamp: answered once
        Arrival.NEW,  # 3 and 4 missed ...
        Arrival.LATE,  # ... then 4 arrives out of order
    ]
    assert ids.repeats == 2 and ids.missed == 1
    assert ids.arrival(4, (0, 4)) is Arrival.REPEAT
    # the counter goes back: a new acquisition, whose uniqueIds are new again
    assert ids.arrival(1, (1, 0)) is Arrival.RESTART
    assert ids.arrival(2, (1, 1)) is Arrival.NEW
    assert ids.missed == 1
    # a huge jump is counted, not listed
    assert ids.arrival(10**9, (2, 0)) is Arrival.NEW
    assert ids.missed == 1 + 10**9 - 3


def test_a_restart_whose_clock_stepped_back_still_starts_a_new_acquisition():
    """Issue 22 item 18: answers from several workers, arriving out of order, are told
    apart by the acquisition a witness of the source saw them in, which the time stamps
    alone cannot do once the detector's clock stepped back."""
    witness, order, by_stamp = FrameIds(numbered=True), AcquisitionOrder(), AcquisitionOrder()
    first = [(uid, (100, uid)) for uid in range(1, 11)]
    second = [(uid, (50, uid)) for uid in range(1, 6)]  # the clock went back 50 s
    for uid, stamp in first + second:
        witness.arrival(uid, stamp)
    assert witness.acquisition == 1 and witness.acquisition_of(*second[0]) == 1
    assert witness.acquisition_of(*first[-1]) == 0 and witness.acquisition_of(99, (1, 0)) is None

    def answer(uid, stamp):
        numbered = order.arrival(uid, stamp, witness.acquisition_of(uid, stamp))
        return numbered, by_stamp.arrival(uid, stamp)

    for uid, stamp in first[:8]:
        assert answer(uid, stamp) == ((True, False), (True, False))
    # by the stamps alone no new map starts (and after an earlier restart, every frame of
    # this one would be "late": never stitched)
    assert answer(*second[0]) == ((True, True), (True, False))
    assert answer(*first[8])[0] == (False, False)  # a late one of the first acquisition
    for uid, stamp in second[1:]:
        assert answer(uid, stamp)[0] == (True, False)
    assert order.current(second[2][1], 1) and not order.current(first[9][1], 0)


def test_the_frame_account_adds_up_at_every_moment():
    q = FrameQueue(8)
    stop = threading.Event()
    broken = []

    def source():
        uid = 0
        while not stop.is_set():
            uid += 1
            if uid % 7 == 0:
                q.refuse(uid, f"bad {uid}")
            else:
                q.put(uid)

    def worker():
        while not stop.is_set():
            for uid in q.get_batch(4, timeout=0.01):
                if uid % 2:
                    q.settle_bad(uid, "odd")
                else:
                    q.settle_answered()

    def reader():
        while not stop.is_set():
            c = q.counts()
            if c["in"] != c["out"] + c["dropped"] + c["bad"] + c["in_flight"]:
                broken.append(c)
            if not 0 <= c["in_flight"] <= 8 + 4:
                broken.append(c)

    threads = [threading.Thread(target=f) for f in (source, worker, reader)]
    for t in threads:
        t.start()
    try:  # a run long enough for every path: frames dropped, answered and refused
        done = lambda: (c := q.counts())["dropped"] > 100 and c["out"] > 100 and c["bad"] > 100  # noqa: E731
        wait_until(done, 60, "frames of every fate")
    finally:
        stop.set()
    for t in threads:
        t.join()
    for _ in q.get_batch(100, timeout=0.01):
        q.settle_answered()
    c = q.counts()
    assert not broken, broken[:3]
    assert c["in"] > 100 and c["in_flight"] == 0
    assert c["in"] == c["out"] + c["dropped"] + c["bad"]
    reasons = q.take_reasons()
    # refusals are summarised by kind, numbers aside, with one example each
    assert {reason.split()[0] for _, _, reason, _ in reasons} == {"bad", "odd"}
    assert sum(n for n, *_ in reasons) == c["bad"]
    assert q.take_reasons() == []


def test_a_dying_worker_is_restarted_and_one_that_keeps_dying_is_fatal():
    stop = threading.Event()
    deaths, fatal = [], []
    sup = Supervisor(stop, lambda n, e: deaths.append(n), fatal.append, 3, 60, 0.01)
    runs = []

    def flaky():
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("boom")
        stop.wait()

    sup.start(flaky, "flaky")
    deadline = time.monotonic() + 5
    while len(runs) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runs == [1, 1] and deaths == ["flaky"] and not fatal

    def hopeless():
        raise ValueError("always")

    thread = sup.start(hopeless, "hopeless")
    thread.join(5)
    assert not thread.is_alive()
    assert len(fatal) == 1 and "hopeless died 3 times" in fatal[0]
    assert sup.failed == fatal[0]
    stop.set()
    sup.join(5)


def test_a_flood_of_light_keeps_the_brightest_peaks_and_says_how_many_it_left_out():
    rng = np.random.default_rng(0)
    flood = rng.poisson(1000.0, (512, 512)).astype(np.float32)
    flood[::4, ::4] += rng.uniform(0, 5000, flood[::4, ::4].shape)
    peaks = find_peaks(flood, threshold=500.0, min_separation=1, max_peaks=300)
    assert peaks.truncated > 1000
    assert 0 < len(peaks) <= 300
    kept = flood[peaks.rows, peaks.cols]
    assert kept.min() >= np.sort(flood[::4, ::4].ravel())[-2000]  # among the brightest


def _field_values():
    scalar = st.one_of(
        st.integers(-(2**31), 2**31 - 1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8),
        st.booleans(),
    )
    return st.one_of(scalar, st.lists(st.integers(-100, 100), max_size=5).map(np.array), st.none())


@st.composite
def malformed_ntndarrays(draw):
    """An NTNDArray with any union member, dimensions, codec, sizes and attributes."""
    code, member = draw(st.sampled_from(sorted(ntnd._CODE2UNION.items())))
    n = draw(st.integers(0, 300))
    data = draw(st.binary(min_size=n, max_size=n))
    dtype = np.dtype(code)
    if dtype.kind == "b":
        flat = np.frombuffer(data, np.uint8).astype(bool)
    else:  # any bit pattern: NaN and Inf floats included
        flat = np.frombuffer(data[: n - n % dtype.itemsize], dtype)
    dims = draw(st.lists(st.integers(-2, 40), max_size=4))
    attrs = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["Mode", "SampleX", "SampleY", "ColorMode", "x"]), _field_values()
            ),
            max_size=4,
        )
    )
    value = {
        "value": (member, flat),
        "codec": {"name": draw(st.sampled_from(["", "none", "lz4", "bslz4", "blosc", "zz"]))},
        "compressedSize": draw(st.integers(-5, 400)),
        "uncompressedSize": draw(st.integers(-5, 400)),
        "uniqueId": draw(st.integers(-5, 50)),
        "dimension": [{"size": d} for d in dims],
        "attribute": [{"name": k, "value": v} for k, v in attrs if v is not None],
    }
    return Value(ntnd._ND_TYPE, value)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed_ntndarrays())
def test_the_decoder_answers_or_refuses_with_one_error_type(value):
    try:
        frame = ntnd.decode(value)
    except ntnd.FrameError:
        return
    assert frame.data.ndim == 2 and frame.data.size > 0


def test_the_decoder_refuses_a_structure_that_is_not_an_ntndarray():
    with pytest.raises(ntnd.FrameError, match="malformed NTNDArray"):
        ntnd.decode(Value(Type([("dimension", "ai")]), {"dimension": [3, 4]}))
