"""Inference backends by configuration: the exported ONNX graph gives torch's outputs within
the stated tolerance (fp32 and fp16), the TensorRT engine cache is keyed by everything an
engine depends on and rebuilds what does not load, a backend this host cannot run says what
is missing, and a running edge hot-swaps models on every backend that runs here while a
load on one that cannot fails with the reason and the old model keeps serving."""

import time

import numpy as np
import pytest
import torch

from edgeloop.edge_pva.inference import (
    make_backend,
)
from edgeloop.edge_pva.tolerance import violations
from edgeloop.models import kind as model_kind
from tests.kit.models import add_approved
from tests.kit.networks import ARCH, network


# ---- a running edge ----------------------------------------------------------------------
def _edge(tmp_path, backend: str):
    from p4p.client.thread import Context
    from p4p.server import Server
    from p4p.server.thread import SharedPV

    from edgeloop.edge_pva.server import EdgeServer
    from tests.kit.env import random_prefix
    from tests.kit.servers import small_config

    cfg, _ = small_config(tmp_path, random_prefix("b"))
    cfg.edge.backend = backend
    source = SharedPV()
    server = Server(providers=[{f"{cfg.prefix}src:Image": source}])
    try:
        edge = EdgeServer(cfg, input_pv=f"{cfg.prefix}src:Image").start()
    except BaseException:
        server.stop()
        raise
    return edge, source, server, Context("pva", nt=False)


@pytest.fixture
def edge_on(tmp_path, request):
    started = []

    def start(backend):
        started.append(_edge(tmp_path, backend))
        return started[-1]

    yield start
    for edge, _, server, ctx in started:
        ctx.close()
        edge.stop()
        server.stop()


def _add(registry, seed: int, security) -> tuple[int, torch.nn.Module]:
    from edgeloop.registry import model_to_bytes

    model = network("ptychonn", seed)
    data = model_to_bytes("ptychonn", ARCH["ptychonn"], model)
    return add_approved(registry, data, {"kind": "ptychonn"}, security), model


def _answer(ctx, edge, source, frame: np.ndarray, uid: int):
    from edgeloop import ntnd
    from edgeloop.app.answers import AnswerCollector
    from tests.kit.answers import post

    phase = AnswerCollector(ctx, f"{edge.prefix}edge:Phase")
    try:
        deadline = time.monotonic() + 30
        while True:  # the first frames may come before the edge's monitor connects
            post(source, ntnd.build(frame, uid))
            wait_until = time.monotonic() + 1.0
            while time.monotonic() < wait_until:
                with phase.lock:
                    got = [f for f in phase.frames if f.unique_id == uid]
                if got:
                    return got[0].data
                time.sleep(0.02)
            assert time.monotonic() < deadline, "no answer from the edge"
            uid += 1000
    finally:
        phase.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_hot_swap_on_each_backend_that_runs_here(edge_on, backend):
    edge, source, _, ctx = edge_on(backend)
    frame = np.random.default_rng(2).poisson(50.0, (64, 64)).astype(np.uint16)
    _answer(ctx, edge, source, frame, 1)
    for seed in (1, 2):  # twice: a swap away from a swapped-in model too
        version, model = _add(edge.registry, seed, edge.cfg.security)
        ctx.put(f"{edge.prefix}edge:LoadModel", version, timeout=60, wait=True)
        served = edge.slots["ptychonn"].get()
        assert served.version == version and served.backend.name == backend
        phase = _answer(ctx, edge, source, frame, 10 * seed)
        x = model_kind("ptychonn").preprocess([frame.astype(np.float32)], 64)
        ref = make_backend("torch", model, 64)(x)[1][0, 0]
        assert violations("ptychonn", "fp32", ("phase",), (phase,), (ref,)) == []
    counts = edge.queue.counts()
    assert counts["in"] == counts["out"] + counts["dropped"] + counts["bad"] + counts["in_flight"]


@pytest.mark.timeout(180)
def test_load_on_a_backend_this_host_lacks_fails_with_the_reason_and_the_old_model_serves(
    edge_on, no_gpu
):
    edge, source, _, ctx = edge_on("torch")
    first, _ = _add(edge.registry, 1, edge.cfg.security)
    ctx.put(f"{edge.prefix}edge:LoadModel", first, timeout=60, wait=True)
    candidate, _ = _add(edge.registry, 2, edge.cfg.security)
    edge.cfg.edge.backend = "torch-cuda"  # as if the edge had been configured for a GPU
    with pytest.raises(Exception, match="needs a CUDA GPU"):
        ctx.put(f"{edge.prefix}edge:LoadModel", candidate, timeout=60, wait=True)
    assert edge.slots["ptychonn"].get().version == first
    assert "needs a CUDA GPU" in ctx.get(f"{edge.prefix}edge:Message", timeout=5)["value"]
    assert edge.registry.meta(candidate).get("status") != "rejected"  # not the model's fault
    frame = np.random.default_rng(3).poisson(50.0, (64, 64)).astype(np.uint16)
    _answer(ctx, edge, source, frame, 1)  # still answering, with the old model
    edge.cfg.edge.backend = "torch"
    ctx.put(f"{edge.prefix}edge:LoadModel", candidate, timeout=60, wait=True)
    assert edge.slots["ptychonn"].get().version == candidate
