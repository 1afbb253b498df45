"""Decompression bombs through a running edge and retraining service: a few MB of zlib, LZ4
or blosc that would expand to about 2 GiB is refused by both within the size its frame
declares (their peak memory grows by less than a frame's worth), counted by the edge, and
the next frame is answered."""

import numpy as np
import pytest
from p4p.server import Server
from p4p.server.thread import SharedPV

from edgeloop import ntnd
from edgeloop.waiting import wait_until
from tests.kit.answers import post
from tests.kit.bombs import GIB, LZ4_MAX, bomb_frame
from tests.kit.env import DEADLINE_SLACK, free_port, random_prefix
from tests.kit.servers import System, small_config

pytestmark = [pytest.mark.timeout(300)]

# "a frame's worth". The bombs' payloads are 2-9 MB; receiving one costs pvAccess about
# three times its size (25 MB was measured for the lot), and expanding one 2 GiB
MAX_FRAME_BYTES = 32 << 20
BOMBS = [
    ("zlib", 2 * GIB, None),
    ("lz4", LZ4_MAX, None),
    ("blosc", 2 * GIB - 64, None),
    ("zlib", 2 * GIB, 2 * GIB),  # one that declares what it expands to
]


def peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory, bytes (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        line = next(s for s in status if s.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bounded")
    cfg, path = small_config(tmp, random_prefix("b"))
    cfg.edge.max_frame_bytes = MAX_FRAME_BYTES
    cfg.dump(path)
    name = f"{cfg.prefix}src:Image"
    source = SharedPV(initial=ntnd.build(np.zeros((64, 64), np.uint16), 0))
    server = Server(providers=[{name: source}])
    sys_ = System(cfg, path, tmp / "logs", env={"EDGELOOP_BEAMLINE_CA_PORT": str(free_port())})
    try:
        sys_.start("ioc", ready_pv="ml:Status")
        sys_.start("edge", "--input-pv", name, ready_pv="edge:ModelVersion")
        sys_.start("retrain-service", "--input-pv", name)
        yield sys_, source
    finally:
        sys_.stop()
        server.stop()


def test_decompression_bombs_are_refused_by_the_edge_and_the_service(loop):
    system, source = loop
    edge, service = (system.procs[n].proc.pid for n in ("edge", "retrain-service"))
    frame = np.random.default_rng(0).poisson(20, (64, 64)).astype(np.uint16)
    for uid in (1, 2):  # warm: the model has run, the buffers are there
        post(source, ntnd.build(frame, uid, codec="zlib"))
        system.settled(lambda c, uid=uid: c["FramesOut"] == uid and c["InFlight"] == 0)
    before = {"edge": peak_rss(edge), "service": peak_rss(service)}
    uid = 2
    for codec, expands_to, declared in BOMBS:
        uid += 1
        post(source, bomb_frame(codec, expands_to, uid, declared))
        system.settled(lambda c, uid=uid: c["FramesIn"] == uid and c["InFlight"] == 0)
    post(source, ntnd.build(frame, uid + 1, codec="zlib"))
    counts = system.settled(lambda c: c["FramesOut"] == 3 and c["InFlight"] == 0)
    assert counts["BadFrames"] == len(BOMBS) and counts["FramesIn"] == uid + 1, counts
    # the service's live reference logs its refusals at the 1st, 2nd, 4th, ...
    wait_until(
        lambda: f"{len(BOMBS)} refused" in system.procs["retrain-service"].output(),
        60 * DEADLINE_SLACK,
        "the service to refuse every bomb",
        detail=system.outputs,
    )
    grew = {
        "edge": peak_rss(edge) - before["edge"],
        "service": peak_rss(service) - before["service"],
    }
    assert max(grew.values()) < MAX_FRAME_BYTES, f"peak memory grew by {grew} bytes"
    edge_log = system.procs["edge"].output()
    for codec in ("zlib", "lz4", "blosc"):
        assert f"{codec} payload" in edge_log or f"{codec} header" in edge_log, edge_log[-3000:]
    assert "above edge.max_frame_bytes" in edge_log
