"""``edgeloop edge --workers 2``: two worker processes share one detector stream through the
source's data distributor (pvDatabase: pvapy here, areaDetector's NDPluginPva at a
beamline) and answer under the one set of ``edge:`` PVs: every frame once, the counters
summed and consistent, one stitched map; LoadModel reaches both workers; a killed worker is
restarted and reported; a source without the distributor (p4p) still gets each frame
answered once, the copies counted in Repeats and said in Message."""

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from p4p.client.thread import Context
from p4p.server import Server
from p4p.server.thread import SharedPV

from edgeloop import ntnd
from edgeloop.app.answers import AnswerCollector
from edgeloop.app.processes import wait_for_pv
from edgeloop.edge_pva.stitch import PhaseMap
from edgeloop.edge_pva.workers import WorkerCounts
from edgeloop.models import kind as model_kind
from edgeloop.registry import NOT_NOW, Registry, model_to_bytes
from edgeloop.waiting import wait_until
from tests.kit.answers import post
from tests.kit.env import KIT, random_prefix
from tests.kit.models import add_approved
from tests.kit.pvapy_sources import Witness, ad_sim_server
from tests.kit.servers import System, small_config

WORKER_LOAD_TIMEOUT_S = 15.0  # a stopped worker's load is given up after this

pytestmark = [pytest.mark.timeout(120)]


@contextlib.contextmanager
def two_workers(tmp: Path, request, prefix: str, input_pv: str):
    """``edgeloop edge --workers 2`` (a subprocess, stopped by PID) once both workers
    serve; its output printed if what ran with it failed."""
    cfg, path = small_config(tmp, prefix)
    cfg.edge.worker_load_timeout_s = WORKER_LOAD_TIMEOUT_S
    cfg.dump(path)
    sys_ = System(cfg, path, tmp / "logs")
    failed, ok = request.session.testsfailed, False
    try:
        sys_.start("edge", "--workers", "2", "--input-pv", input_pv, ready_pv="edge:Message")
        for k in (1, 2):
            wait_for_pv(sys_.ctx, f"{prefix}edge:w{k}:Started", 90, sys_.procs["edge"])
        yield sys_
        ok = True
    finally:
        sys_.stop()
        if not ok or request.session.testsfailed > failed:
            print(sys_.outputs())


def settled(sys_: System, n: int, timeout: float = 30, quiet_s: float = 0.5) -> dict:
    """The aggregate's counters once n frames are answered and they have not moved for
    ``quiet_s``, adding up."""
    return sys_.settled(lambda c: c["FramesOut"] >= n, quiet_s, timeout)


def test_worker_counts_add_up_across_a_restart():
    counts_ = WorkerCounts()
    polled = {"FramesIn": 10, "FramesOut": 7, "Dropped": 1, "BadFrames": 0, "InFlight": 2}
    polled.update(Repeats=0, Restarts=0, Started=1.0)
    assert counts_.update(1, polled) is None
    assert counts_.update(2, dict(polled, FramesIn=11)) is None  # caught between posts
    assert counts_.update(2, dict(polled, Started=2.0)) is None
    # worker 1 started again: its two frames in flight were lost with it
    again = dict(polled, Started=3.0, FramesIn=1, FramesOut=1, Dropped=0, InFlight=0)
    assert counts_.update(1, again) == 2
    total = counts_.totals(duplicates=1)  # one frame answered by both
    assert total["FramesIn"] == 10 + 10 + 1 - 1 and total["FramesOut"] == 7 + 7 + 1 - 1
    assert total["Dropped"] == 1 + 2 + 1 and total["InFlight"] == 2
    settled_ = ("FramesOut", "Dropped", "BadFrames", "InFlight")
    assert total["FramesIn"] == sum(total[n] for n in settled_)
    assert total["Repeats"] == 1 and total["Restarts"] == 1


class Messages:
    """Every edge:Message update, with its severity."""

    def __init__(self, ctx: Context, pv: str):
        self.seen: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self.sub = ctx.monitor(pv, self._on)

    def _on(self, value):
        if not isinstance(value, Exception):
            with self._lock:
                self.seen.append((value["value"], int(value["alarm.severity"])))

    def wait(self, predicate, timeout: float = 60) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                hit = next((m for m in self.seen if predicate(*m)), None)
            if hit:
                return hit
            time.sleep(0.1)
        raise TimeoutError(f"no such message in {self.seen}")

    def close(self):
        self.sub.close()


def test_two_workers_answer_every_frame_of_pvapy_ad_sim_server_once(tmp_path, request):
    prefix = random_prefix("a")
    ctx = Context("pva", nt=False)
    try:
        # frames start after a delay that the edge and both workers are up within; a delay
        # too short for a loaded host is doubled
        args = ("-nx", "64", "-ny", "64", "-dt", "uint8", "-nf", "10")
        for attempt, delay in enumerate((30, 60, 120)):
            channel = f"{prefix}sim{attempt}:Image"
            with ad_sim_server(channel, *args, fps=100, runtime=3, start_delay=delay) as source:
                witness = Witness(ctx, channel)
                folder = tmp_path / str(attempt)
                folder.mkdir()
                with two_workers(folder, request, prefix, channel) as edge:
                    outputs = AnswerCollector(ctx, f"{edge.prefix}edge:Phase")
                    if source.sending(ctx):
                        source.abandon()
                        outputs.close()
                        witness.close()
                        continue
                    wait_until(lambda: source.sending(ctx), delay + 30, "the first frame")
                    sent = wait_sent(witness)
                    total = settled(edge, len(sent))
                    answers = [f.unique_id for f in outputs.wait(len(sent), timeout=30)]
                    workers = [edge.counts(f"edge:w{k}:") for k in (1, 2)]
                    outputs.close()
            witness.close()
            break
        else:
            raise AssertionError("the edge's workers were never up before the first frame")
    finally:
        ctx.close()
    assert len(sent) >= 290  # 3 s at 100 frames/s
    assert sorted(answers) == sorted(sent)  # every frame, once
    assert total["FramesIn"] == total["FramesOut"] == len(sent), total
    assert total["Dropped"] == total["BadFrames"] == total["MissedFrames"] == 0, total
    # a worker that connected while frames flowed answers the one the source held again
    assert total["Repeats"] <= 2, total
    for w in workers:  # the distributor shared the frames between them
        assert w["FramesOut"] > len(sent) // 4, workers
    assert sum(w["FramesOut"] for w in workers) == len(sent) + total["Repeats"], workers


def wait_sent(witness: Witness, quiet_s: float = 2.0, timeout: float = 30) -> set:
    """The frames the source sent, once it has sent none for ``quiet_s``."""
    deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        n = len(witness.frames)
        if n != last:
            last, since = n, time.monotonic()
        elif n and time.monotonic() - since > quiet_s:
            return witness.sent()
        time.sleep(0.2)
    raise TimeoutError(f"the source kept sending: {last} frames")


def scan_frames(path: Path, n_side: int = 7, step_um: float = 0.2, size: int = 64) -> int:
    """A raster scan's diffraction-like frames and positions (um), overlapping patches."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[-size // 2 : size // 2, -size // 2 : size // 2]
    rings = 300 * np.exp(-((np.hypot(yy, xx) % 7) ** 2) / 3)
    frames = rng.poisson(rings + 3, (n_side * n_side, size, size)).astype(np.float32)
    grid = (np.arange(n_side) - (n_side - 1) / 2) * step_um
    x, y = (a.ravel() for a in np.meshgrid(grid, grid))
    np.savez(path, frames=frames, x=x, y=y)
    return len(frames)


def wait_pv(sys_: System, name: str, predicate, timeout: float = 10):
    def holds():
        value = sys_.pv(name)
        return (value,) if predicate(value) else None  # a tuple: true whatever the value

    return wait_until(holds, timeout, name, 0.1)[0]


def command(source: subprocess.Popen, line: str) -> int:
    """Tell pvapy_frames.py what to post; the last uniqueId it posted."""
    source.stdin.write(f"{line}\n")
    source.stdin.flush()
    answer = source.stdout.readline().split()
    assert answer[:1] == ["posted"], answer
    return int(answer[1])


def test_one_stitched_map_from_both_workers_of_a_pvapy_source(tmp_path, request):
    """A pvapy PvaServer posts frames with SampleX/SampleY: the aggregate's edge:PhaseMap is
    the map of all answers, while each worker's own map holds only its share."""
    n = scan_frames(tmp_path / "scan.npz")
    prefix = random_prefix("m")
    channel = f"{prefix}scan:Image"
    source = subprocess.Popen(
        [sys.executable, str(KIT / "pvapy_frames.py"), channel]
        + [str(tmp_path / "scan.npz"), "40"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    ctx = Context("pva", nt=False)
    try:
        assert source.stdout.readline().strip() == "ready"
        with two_workers(tmp_path, request, prefix, channel) as edge:
            cfg = edge.cfg
            # frames without a position until each worker has one: both are connected
            while not all(edge.value(f"edge:w{k}:FramesIn") for k in (1, 2)):
                warm = command(source, "one")
                time.sleep(0.5)
            settled(edge, warm)
            outputs = AnswerCollector(ctx, f"{edge.prefix}edge:Phase")
            assert command(source, "go") == warm + n
            total = settled(edge, warm + n)
            outputs.wait(n, timeout=30)  # and the one it held on connecting, if any
            answers = [f for f in outputs.frames if f.unique_id > warm]
            outputs.close()
            whole = wait_pv(edge, "edge:PhaseMap", lambda v: v["uniqueId"] == n)
            shares = [
                wait_pv(edge, f"edge:w{k}:PhaseMap", lambda v: v["uniqueId"] > 0) for k in (1, 2)
            ]
            scan = edge.value("edge:ScanConsistency")
    finally:
        ctx.close()
        source.stdin.close()
        try:
            source.wait(10)
        except subprocess.TimeoutExpired:
            source.send_signal(signal.SIGTERM)
            source.wait(10)
        source.stdout.close()
    assert total["FramesOut"] == total["FramesIn"] == warm + n and total["Repeats"] == 0, total
    assert sorted(f.unique_id for f in answers) == list(range(warm + 1, warm + n + 1))
    reference = PhaseMap(
        cfg.edge.map_size, cfg.model.input_size, cfg.sim.pixel_um, cfg.edge.stitch_sigma_px
    )
    for frame in answers:
        assert reference.add(frame.data, frame.attributes["SampleX"], frame.attributes["SampleY"])
    np.testing.assert_allclose(ntnd.decode(whole).data, reference.image(), atol=1e-4)
    counts_ = [share["uniqueId"] for share in shares]  # a map's uniqueId: its patches
    assert all(0 < c < n for c in counts_) and sum(counts_) == n, counts_
    assert np.isfinite(scan)


# ---- an edge fed by a p4p server, which has no distributor: shared by the tests below ----
class Fed:
    """An edge of two workers, the p4p SharedPV it monitors (served before it starts), and
    every edge:Message since it started."""

    def __init__(self, edge: System, source: SharedPV):
        self.edge, self.source, self.uid = edge, source, 0
        self.messages = Messages(edge.ctx, f"{edge.prefix}edge:Message")

    def post(self, n: int, pace_s: float = 0.03) -> list[int]:
        rng = np.random.default_rng(self.uid)
        uids = []
        for _ in range(n):
            self.uid += 1
            post(self.source, ntnd.build(rng.poisson(20.0, (64, 64)).astype(np.uint16), self.uid))
            uids.append(self.uid)
            time.sleep(pace_s)
        return uids

    def connected(self, timeout: float = 60) -> dict:
        """Post frames one by one until the aggregate has an answer to one frame from both
        workers (a Repeat: each worker's monitor on the source, and the aggregate's on each
        worker's answers, are connected); the counters once those have settled."""
        start = self.edge.value("edge:Repeats")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.post(1)
            time.sleep(0.5)
            if self.edge.value("edge:Repeats") > start:
                # long enough for a probe answered late to reach the aggregate's sums
                return settled(self.edge, 0, quiet_s=2.0)
        raise TimeoutError(
            f"the workers' answers do not reach the aggregate\n{self.edge.outputs()}"
        )


@pytest.fixture(scope="module")
def p4p_fed(tmp_path_factory, request):
    prefix = random_prefix("p")
    source = SharedPV(initial=ntnd.build(np.zeros((64, 64), np.uint16), 0))
    server = Server(providers=[{f"{prefix}src:Image": source}])
    try:
        tmp = tmp_path_factory.mktemp("workers")
        with two_workers(tmp, request, prefix, f"{prefix}src:Image") as edge:
            fed = Fed(edge, source)
            try:
                yield fed
            finally:
                fed.messages.close()
    finally:
        server.stop()


def delta(after: dict, before: dict) -> dict:
    return {name: after[name] - before[name] for name in after}


def test_a_source_without_the_distributor_is_answered_once_and_said(p4p_fed):
    edge = p4p_fed.edge
    before = p4p_fed.connected()
    workers = [edge.counts(f"edge:w{k}:") for k in (1, 2)]
    outputs = AnswerCollector(edge.ctx, f"{edge.prefix}edge:Phase")
    try:
        uids = p4p_fed.post(20)
        total = delta(settled(edge, before["FramesOut"] + len(uids), quiet_s=2.0), before)
        outputs.wait(len(uids), timeout=30)  # and the one it held on connecting, if any
        answers = [f.unique_id for f in outputs.frames if f.unique_id >= uids[0]]
    finally:
        outputs.close()
    assert sorted(answers) == uids  # once each, though both workers answered each
    assert total["FramesIn"] == total["FramesOut"] == len(uids), total
    assert total["Repeats"] == len(uids), total  # the second worker's copy of each
    for k in (1, 2):
        assert delta(edge.counts(f"edge:w{k}:"), workers[k - 1])["FramesOut"] == len(uids)
    text, severity = p4p_fed.messages.wait(lambda m, s: "does not distribute" in m, 10)
    assert severity == 1 and "--workers 1" in text


def add_ptychonn(registry: Registry, seed: int, security) -> int:
    torch.manual_seed(seed)
    arch = {"width": 8}
    model = model_kind("ptychonn").build(**arch)
    blob = model_to_bytes("ptychonn", arch, model)
    return add_approved(registry, blob, {"kind": "ptychonn"}, security)


def test_load_model_reaches_both_workers(p4p_fed):
    edge = p4p_fed.edge
    registry = Registry(edge.cfg.registry_path)
    good = add_ptychonn(registry, 0, edge.cfg.security)
    edge.ctx.put(f"{edge.prefix}edge:LoadModel", good, timeout=90)
    for k in (1, 2):
        assert edge.value(f"edge:w{k}:ModelVersion") == good
    edge.wait_value("edge:ModelVersion", lambda v: v == good, timeout=10)

    bad = add_ptychonn(registry, 1, edge.cfg.security)
    registry.mark_rejected(bad, "quality gate: worse than the serving model")
    with pytest.raises(Exception, match="never served") as refused:
        edge.ctx.put(f"{edge.prefix}edge:LoadModel", bad, timeout=90)
    assert "w1:" in str(refused.value) and "w2:" in str(refused.value)
    assert edge.value("edge:ModelVersion") == good


def worker_process(edge: System, k: int) -> psutil.Process:
    parent = psutil.Process(edge.procs["edge"].proc.pid)
    found = [p for p in parent.children() if f" --worker {k} " in " ".join(p.cmdline()) + " "]
    assert len(found) == 1, [p.cmdline() for p in parent.children()]
    return found[0]


def test_a_version_one_worker_does_not_load_is_withdrawn_from_every_worker(p4p_fed):
    """All or none (issue 22 item 6): worker 2 stopped, the load times out there; worker 1,
    which loaded it, serves the old model again, and so does worker 2 once it runs again.
    The aggregate alone records; the version is not rejected (no fault of its own) and
    loads on both once both answer."""
    edge = p4p_fed.edge
    registry = Registry(edge.cfg.registry_path)
    old, new = (
        add_ptychonn(registry, 2, edge.cfg.security),
        add_ptychonn(registry, 3, edge.cfg.security),
    )
    edge.ctx.put(f"{edge.prefix}edge:LoadModel", old, timeout=90)
    # w1's version watched by a monitor, opened before w2 stops: a search sent while w2 is
    # stopped may reach w2 alone (unicast to the host's shared UDP port), and a get's
    # channel is dropped from the client's cache after a while unused (CI: a get of w1's
    # PV after the minute-long put below timed out); a monitor keeps its channel
    seen = queue.Queue()
    sub = edge.ctx.monitor(f"{edge.prefix}edge:w1:ModelVersion", seen.put)
    try:
        w1_versions = [wait_until(lambda: _latest(seen), 30, "w1's ModelVersion")]
        assert w1_versions == [old]
        w2 = worker_process(edge, 2)
        w2.suspend()
        try:
            with pytest.raises(Exception, match=f"v{new} {NOT_NOW}.*w2: no answer") as refused:
                edge.ctx.put(
                    f"{edge.prefix}edge:LoadModel", new, timeout=WORKER_LOAD_TIMEOUT_S + 60
                )
            assert "w1:" not in str(refused.value)  # worker 1 loaded it, and withdrew it

            def w1_back() -> bool:  # its withdrawal may still be on its way to the monitor
                w1_versions.extend(_drain(seen))
                return w1_versions[-1] == old

            wait_until(
                w1_back, 30, f"w1 serving v{old} again", detail=lambda: f"saw {w1_versions}"
            )
        finally:
            w2.resume()
    finally:
        sub.close()
    edge.wait_value("edge:w2:ModelVersion", lambda v: v == old, timeout=60)  # answers again
    assert registry.accepted("ptychonn") == old
    assert registry.meta(new).get("status") is None  # not the model's fault
    edge.ctx.put(f"{edge.prefix}edge:LoadModel", new, timeout=90)
    assert [edge.value(f"edge:w{k}:ModelVersion") for k in (1, 2)] == [new, new]
    assert registry.accepted("ptychonn") == new and registry.meta(new)["status"] == "accepted"


def _latest(updates: queue.Queue):
    """The newest value a monitor delivered (None if none yet)."""
    values = _drain(updates)
    return values[-1] if values else None


def _drain(updates: queue.Queue) -> list:
    out = []
    while True:
        try:
            value = updates.get_nowait()
        except queue.Empty:
            return out
        if not isinstance(value, Exception):
            out.append(int(value["value"]))


def test_a_killed_worker_is_restarted_and_reported(p4p_fed):
    edge = p4p_fed.edge
    w2 = worker_process(edge, 2)
    started = edge.value("edge:w2:Started")
    restarts = edge.value("edge:Restarts")
    os.kill(w2.pid, signal.SIGKILL)
    text, severity = p4p_fed.messages.wait(lambda m, s: "worker 2" in m and "exited" in m, 30)
    assert severity == 2 and "restarting" in text
    wait_for_pv(edge.ctx, f"{edge.prefix}edge:w2:FramesIn", 90, edge.procs["edge"])
    edge.wait_value("edge:w2:Started", lambda v: v != started, timeout=30)
    edge.wait_value("edge:Restarts", lambda v: v > restarts, timeout=30)
    before = p4p_fed.connected()  # the new worker 2 receives frames
    w2_before = edge.value("edge:w2:FramesOut")
    uids = p4p_fed.post(10)
    total = delta(settled(edge, before["FramesOut"] + len(uids), quiet_s=2.0), before)
    assert total["FramesIn"] == total["FramesOut"] == len(uids), total
    assert edge.value("edge:w2:FramesOut") - w2_before == len(uids)
