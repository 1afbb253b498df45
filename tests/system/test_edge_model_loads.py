"""What the edge serves when model loads go wrong: a transient I/O error rejects nothing, a
rejected version is never served by a write, NaN frames never make a good model look bad,
and an edge SIGKILLed in the middle of a swap serves the last accepted model on restart."""

import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from p4p.client.thread import Context
from p4p.server import Server
from p4p.server.thread import SharedPV

from edgeloop import ntnd
from edgeloop.models import kind as model_kind
from edgeloop.registry import Registry, model_to_bytes
from tests.kit.answers import post
from tests.kit.env import random_prefix
from tests.kit.models import add_approved
from tests.kit.servers import System, small_config
from tests.kit.waiting import wait_process_gone

pytestmark = [pytest.mark.timeout(300)]


def add_ptychonn(registry: Registry, width: int, seed: int, security) -> int:
    torch.manual_seed(seed)
    arch = {"width": width}
    model = model_kind("ptychonn").build(**arch)
    blob = model_to_bytes("ptychonn", arch, model)
    return add_approved(registry, blob, {"kind": "ptychonn"}, security)


@pytest.fixture
def edge(tmp_path):
    """An edge server in this process, fed by a SharedPV the test owns."""
    from edgeloop.edge_pva.server import EdgeServer

    cfg, _ = small_config(tmp_path, random_prefix("l"))
    source = SharedPV()
    server = Server(providers=[{f"{cfg.prefix}src:Image": source}])
    edge = EdgeServer(cfg, input_pv=f"{cfg.prefix}src:Image").start()
    ctx = Context("pva", nt=False)
    try:
        yield edge, source, ctx
    finally:
        ctx.close()
        edge.stop()
        server.stop()


def load(ctx, edge, version):
    ctx.put(f"{edge.prefix}edge:LoadModel", version, timeout=60, wait=True)


def test_transient_io_error_rejects_nothing_and_a_rejected_version_is_never_served(edge):
    edge, _, ctx = edge
    registry = edge.registry
    good = add_ptychonn(registry, 8, 0, edge.cfg.security)
    path = registry.root / f"v{good:04d}.pt"
    saved = path.read_bytes()
    path.unlink()
    path.mkdir()  # reading it fails with an OSError, as a flaky mount would
    with pytest.raises(Exception, match=f"v{good} not loaded now .*file unreadable"):
        load(ctx, edge, good)
    assert registry.meta(good).get("status") != "rejected"
    path.rmdir()
    path.write_bytes(saved)
    load(ctx, edge, good)  # the same version, once readable, serves
    assert edge.slots["ptychonn"].get().version == good
    assert registry.meta(good)["status"] == "accepted"

    bad = add_ptychonn(registry, 8, 1, edge.cfg.security)
    registry.mark_rejected(bad, "quality gate: worse than the serving model")
    with pytest.raises(Exception, match="never served"):
        load(ctx, edge, bad)
    assert edge.slots["ptychonn"].get().version == good
    assert registry.meta(bad)["status_reason"].startswith("quality gate")


def test_nan_frames_never_reach_the_probe_set_that_validates_a_candidate(edge):
    edge, source, ctx = edge
    nan = np.full((64, 64), np.nan, np.float32)
    frames = [ntnd.build(nan, uid) for uid in range(1, 6)]
    frames.append(ntnd.build(np.ones((64, 64), np.float32), 6))
    for i, frame in enumerate(frames, 1):
        post(source, frame)
        deadline = time.monotonic() + 20
        while edge.queue.counts()["in"] < i:  # the first waits for the edge to connect
            assert time.monotonic() < deadline
            time.sleep(0.02)
    while edge.queue.counts()["in_flight"]:
        time.sleep(0.02)
    assert edge.queue.counts()["bad"] == 5 and edge.queue.counts()["out"] == 1
    assert all(np.isfinite(f).all() for f in edge.models.recent["ptychonn"])
    version = add_ptychonn(edge.registry, 8, 2, edge.cfg.security)
    load(ctx, edge, version)
    assert edge.slots["ptychonn"].get().version == version


def test_edge_killed_during_a_swap_serves_the_last_accepted_model_on_restart(tmp_path):
    cfg, path = small_config(tmp_path, random_prefix("k"))
    registry = Registry(cfg.registry_path)
    first = add_ptychonn(registry, 8, 0, cfg.security)
    registry.mark_accepted(first)
    # a wide candidate takes a while to load and validate: the kill lands in the swap
    candidate = add_ptychonn(registry, 48, 1, cfg.security)
    source = SharedPV()
    server = Server(providers=[{f"{cfg.prefix}src:Image": source}])
    post(source, ntnd.build(np.ones((64, 64), np.uint16), 1))
    system = System(cfg, path, tmp_path / "logs")
    args = ("--input-pv", f"{cfg.prefix}src:Image")
    try:
        proc = system.start("edge", *args, ready_pv="edge:ModelVersion")
        assert system.value("edge:ModelVersion") == first
        system.ctx.put(f"{cfg.prefix}edge:LoadModel", candidate, timeout=60, wait=False)
        time.sleep(0.3)
        os.kill(proc.proc.pid, signal.SIGKILL)
        assert wait_process_gone(proc.proc.pid)
        proc.proc.wait(10)
        serving = Registry(cfg.registry_path).accepted("ptychonn")
        assert serving in (first, candidate)  # accepted.json is whole, whichever it names
        system.start("edge", *args, ready_pv="edge:ModelVersion")
        system.wait_value("edge:ModelVersion", lambda v: v == serving, 30)
        assert f"serving ptychonn model v{serving}" in system.procs["edge"].output()
    finally:
        system.stop()
        server.stop()
        shutil.rmtree(tmp_path / "logs", ignore_errors=True)
