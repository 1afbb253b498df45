"""Inference backends by configuration: the exported ONNX graph gives torch's outputs within
the stated tolerance (fp32 and fp16), the TensorRT engine cache is keyed by everything an
engine depends on and rebuilds what does not load, a backend this host cannot run says what
is missing, and a running edge hot-swaps models on every backend that runs here while a
load on one that cannot fails with the reason and the old model keeps serving."""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeloop.config import Backend, Config, ConfigError
from edgeloop.edge_pva.inference import (
    BACKENDS,
    BackendOptions,
    BackendUnavailable,
    backend_options,
    check_backend,
    make_backend,
    resolve_backend,
    unavailable_reason,
)
from edgeloop.edge_pva.tensorrt_backend import (
    EngineKey,
    batch_profile,
    build_engine,
    engine_paths,
    load_or_build,
)
from edgeloop.edge_pva.tolerance import TOLERANCES, resolve_precision, violations
from edgeloop.models import kind as model_kind
from edgeloop.onnx_export import export_onnx
from edgeloop.registry import ModelUnavailable
from tests.kit.networks import SIZE, network


def inputs(kind: str, n: int = 6) -> np.ndarray:
    return np.random.default_rng(1).random((n, 1, SIZE[kind], SIZE[kind])).astype(np.float32)


# ---- ONNX export (what onnxruntime runs and TensorRT builds from) ------------------------
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["ptychonn", "braggnn"])
def test_exported_graph_gives_torchs_outputs_within_the_tolerance(kind, precision):
    import onnx
    import onnxruntime as ort

    model, x = network(kind), inputs(kind)
    graph = export_onnx(model, SIZE[kind], precision)
    with torch.no_grad():
        ref = [o.numpy() for o in model(torch.from_numpy(x))]
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})
    outputs = model_kind(kind).outputs
    assert violations(kind, precision, outputs, got, ref) == []

    proto = onnx.load_from_string(graph)
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    io_types = {v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]}
    assert io_types == {float32}  # the host side is fp32 whatever the precision inside
    weights = {t.data_type for t in proto.graph.initializer if len(t.dims) > 1}
    assert weights == ({float16} if precision == "fp16" else {float32})
    # any batch size
    assert session.run(None, {"x": inputs(kind, 1)})[0].shape[0] == 1


def test_export_is_deterministic_so_its_hash_can_key_the_engine_cache():
    a = export_onnx(network("braggnn", 0), 11)
    again = export_onnx(network("braggnn", 0), 11)
    assert hashlib.sha256(a).hexdigest() == hashlib.sha256(again).hexdigest()
    assert a != export_onnx(network("braggnn", 1), 11)  # other weights, other graph
    assert a != export_onnx(network("braggnn", 0), 11, "fp16")
    with pytest.raises(ValueError, match="fp32 or fp16"):
        export_onnx(network("braggnn"), 11, "int8")


def test_tolerance_catches_a_difference_and_nan():
    ref = (np.zeros((100, 2)),)
    one = np.zeros((100, 2))
    one[7, 1] = 5e-5  # within the largest difference allowed, and the mean
    assert violations("braggnn", "fp32", ("center",), (one,), ref) == []
    one[7, 1] = 2e-4
    (line,) = violations("braggnn", "fp32", ("center",), (one,), ref)
    assert "center" in line and "allowed 0.0001" in line
    (line,) = violations("braggnn", "fp32", ("center",), (ref[0] + 5e-5,), ref)
    assert "mean 5e-05 (allowed 1e-05)" in line
    assert violations("braggnn", "fp32", ("center",), (ref[0] * np.nan,), ref)
    for (kind, precision), per_output in TOLERANCES.items():
        assert tuple(per_output) == model_kind(kind).outputs
        assert precision in ("fp16", "fp32")


# ---- TensorRT engine cache --------------------------------------------------------------
BASE_KEY = EngineKey(
    onnx_sha256="ab" * 32,
    kind="ptychonn",
    version=3,
    tensorrt="10.13.0.35",
    gpu="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    precision="fp16",
    input_size=64,
    batch_profile=(1, 16, 16),
)
OTHER_VALUES = {
    "onnx_sha256": "cd" * 32,
    "kind": "braggnn",
    "version": 4,
    "tensorrt": "11.0.0.1",
    "gpu": "NVIDIA RTX A6000",
    "compute_capability": "8.6",
    "precision": "fp32",
    "input_size": 128,
    "batch_profile": (1, 32, 32),
}


def test_engine_key_changes_with_each_input_and_is_stable_otherwise(tmp_path):
    assert set(OTHER_VALUES) == {f.name for f in dataclasses.fields(EngineKey)}
    assert EngineKey(**BASE_KEY.to_dict() | {"batch_profile": (1, 16, 16)}) == BASE_KEY
    digest = BASE_KEY.digest()
    assert digest == dataclasses.replace(BASE_KEY).digest()
    assert len(digest) == 64
    paths = engine_paths(tmp_path, BASE_KEY)
    assert paths.engine == tmp_path / f"ptychonn-v0003-fp16-{digest[:20]}.engine"
    assert paths.record.suffix == ".json" and paths.record.stem == paths.engine.stem
    assert paths.onnx == tmp_path / f"ptychonn-v0003-fp16-{'ab' * 10}.onnx"
    seen = {digest}
    for name, value in OTHER_VALUES.items():
        other = dataclasses.replace(BASE_KEY, **{name: value})
        assert other.digest() not in seen, name
        assert engine_paths(tmp_path, other).engine != paths.engine, name
        seen.add(other.digest())
    assert batch_profile(16) == (1, 16, 16)
    with pytest.raises(ValueError):
        batch_profile(0)


class FakeTensorRT:
    """Builds "engines" (bytes) and deserializes them, refusing what it did not build."""

    def __init__(self):
        self.builds = 0

    def build(self) -> bytes:
        self.builds += 1
        return b"PLAN" + bytes(1000)

    @staticmethod
    def deserialize(data: bytes):
        return ("engine", len(data)) if data.startswith(b"PLAN") else None


def test_engine_cache_builds_once_and_rebuilds_what_does_not_load(tmp_path, caplog):
    trt = FakeTensorRT()
    paths = engine_paths(tmp_path / "engines", BASE_KEY)
    engine, how = load_or_build(paths, BASE_KEY, trt.build, trt.deserialize)
    assert (engine, how, trt.builds) == (("engine", 1004), "built", 1)
    assert paths.engine.is_file() and paths.record.is_file()
    assert load_or_build(paths, BASE_KEY, trt.build, trt.deserialize)[1] == "cached"
    assert trt.builds == 1

    def damage(what):
        load_or_build(paths, BASE_KEY, trt.build, trt.deserialize)  # a sound cache first
        what()
        builds = trt.builds
        engine, how = load_or_build(paths, BASE_KEY, trt.build, trt.deserialize)
        assert how == "rebuilt" and engine == ("engine", 1004) and trt.builds == builds + 1
        return caplog.records[-1].getMessage()

    data = paths.engine.read_bytes()
    assert "checksum" in damage(lambda: paths.engine.write_bytes(data[:100]))  # truncated
    assert "record" in damage(lambda: paths.record.write_text('{"key": {}}'))  # another key
    assert "unreadable" in damage(lambda: paths.record.write_text("{not json"))

    # an engine TensorRT will not deserialize (another TensorRT build, say) though its
    # record matches
    def foreign():
        bad = b"XXXX" + data[4:]
        paths.engine.write_bytes(bad)
        record = {"key": BASE_KEY.to_dict(), "engine_sha256": hashlib.sha256(bad).hexdigest()}
        paths.record.write_text(json.dumps(record))

    assert "could not deserialize" in damage(foreign)
    assert load_or_build(paths, BASE_KEY, trt.build, trt.deserialize)[1] == "cached"

    # another key: another engine beside it, both kept
    other = dataclasses.replace(BASE_KEY, version=4)
    other_paths = engine_paths(paths.engine.parent, other)
    assert load_or_build(other_paths, other, trt.build, trt.deserialize)[1] == "built"
    assert len(list(paths.engine.parent.glob("*.engine"))) == 2


def test_engine_cache_that_cannot_be_written_still_gives_the_engine(tmp_path):
    trt = FakeTensorRT()
    (tmp_path / "file").write_text("")
    paths = engine_paths(tmp_path / "file" / "engines", BASE_KEY)  # its parent is a file
    engine, how = load_or_build(paths, BASE_KEY, trt.build, trt.deserialize)
    assert engine == ("engine", 1004) and how == "built"
    with pytest.raises(BackendUnavailable, match="just built"):
        load_or_build(paths, BASE_KEY, lambda: b"junk", trt.deserialize)


class _Recorder:
    """A stand-in for the tensorrt module that records what build_engine asks of it."""

    def __init__(self, parse_ok=True, plan=b"PLAN"):
        self.calls, self.parse_ok, self.plan = [], parse_ok, plan
        rec = self

        class Flag:
            STRONGLY_TYPED = 5

        class BuilderFlag:
            TF32 = "TF32"

        class MemoryPoolType:
            WORKSPACE = "WORKSPACE"

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                rec.calls.append(("set_shape", name, lo, opt, hi))

        class Config:
            def set_memory_pool_limit(self, pool, size):
                rec.calls.append(("pool", pool, size))

            def clear_flag(self, flag):
                rec.calls.append(("clear_flag", flag))

            def add_optimization_profile(self, profile):
                rec.calls.append(("profile",))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                rec.calls.append(("network", flags))
                return "network"

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                rec.calls.append(("build",))
                return rec.plan

        class OnnxParser:
            num_errors = 1

            def __init__(self, network, logger):
                pass

            def parse(self, data):
                rec.calls.append(("parse", len(data)))
                return rec.parse_ok

            def get_error(self, i):
                return "node Foo: unsupported operator"

        self.NetworkDefinitionCreationFlag = Flag
        self.BuilderFlag = BuilderFlag
        self.MemoryPoolType = MemoryPoolType
        self.Builder, self.OnnxParser = Builder, OnnxParser


def test_build_engine_asks_tensorrt_for_a_strongly_typed_network_with_a_batch_profile():
    trt = _Recorder()
    assert build_engine(trt, None, b"onnx", 64, (1, 16, 16), "fp32") == b"PLAN"
    assert ("network", 1 << 5) in trt.calls  # the precision is the graph's
    assert ("clear_flag", "TF32") in trt.calls  # fp32 is IEEE fp32
    assert ("set_shape", "x", (1, 1, 64, 64), (16, 1, 64, 64), (16, 1, 64, 64)) in trt.calls
    assert trt.calls[-1] == ("build",)
    trt = _Recorder()
    build_engine(trt, None, b"onnx", 11, (1, 512, 512), "fp16")
    assert not any(c[0] == "clear_flag" for c in trt.calls)
    with pytest.raises(BackendUnavailable, match="unsupported operator"):
        build_engine(_Recorder(parse_ok=False), None, b"onnx", 64, (1, 16, 16), "fp16")
    with pytest.raises(BackendUnavailable, match="could not build"):
        build_engine(_Recorder(plan=None), None, b"onnx", 64, (1, 16, 16), "fp16")


# ---- what each backend needs -------------------------------------------------------------


def test_gpu_backends_fail_at_construction_naming_what_is_missing(no_gpu):
    model = network("ptychonn")
    with pytest.raises(BackendUnavailable) as exc:
        make_backend("torch-cuda", model, 64)
    assert str(exc.value).startswith("edge.backend 'torch-cuda' needs a CUDA GPU; ")
    assert "torch.cuda.is_available() is False on this host" in str(exc.value)
    # rejects no model version, and code that leaves out missing packages leaves it out
    assert isinstance(exc.value, ModelUnavailable) and isinstance(exc.value, ImportError)
    with pytest.raises(BackendUnavailable) as exc:
        options = BackendOptions(engine_cache=Path("/nonexistent"))
        make_backend("tensorrt", model, 64, options=options)
    message = str(exc.value)
    assert message.startswith("edge.backend 'tensorrt' needs a CUDA GPU")
    assert "and NVIDIA's tensorrt package >= 10" in message
    assert not Path("/nonexistent").exists()  # nothing exported or written before the check
    assert unavailable_reason("tensorrt") == message
    for name in ("torch", "onnxruntime"):
        check_backend(name)
        assert unavailable_reason(name) is None
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
        check_backend("torch-cuda")
    with pytest.raises(ValueError, match="unknown inference backend"):
        check_backend("tensorrt-on-cpu")


def test_auto_takes_onnxruntime_where_it_is_installed_else_torch(monkeypatch):
    from edgeloop.edge_pva import inference

    assert resolve_backend("auto") == "onnxruntime" and unavailable_reason("auto") is None
    assert type(make_backend("auto", network("braggnn"), 11)).__name__ == "OnnxBackend"
    missing = "edge.backend 'onnxruntime' cannot run here: no onnxruntime"
    real = inference.unavailable_reason
    monkeypatch.setattr(
        inference, "unavailable_reason", lambda n: missing if n == "onnxruntime" else real(n)
    )
    assert resolve_backend("auto") == "torch"
    assert type(make_backend("auto", network("braggnn"), 11)).__name__ == "TorchBackend"
    assert resolve_backend("tensorrt") == "tensorrt"


def test_torch_backend_runs_on_the_cpu_even_where_cuda_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend = make_backend("torch", network("braggnn"), 11)
    assert backend.device.type == "cpu"
    assert next(backend.model.parameters()).device.type == "cpu"


def test_configuration_names_the_backends_and_their_options(tmp_path):
    assert set(Backend.__args__) == {*BACKENDS, "auto"}
    with pytest.raises(ConfigError, match="edge.backend"):
        Config.from_dict({"edge": {"backend": "trt"}})
    with pytest.raises(ConfigError, match="edge.precision"):
        Config.from_dict({"edge": {"precision": "int8"}})
    cfg = Config(registry_dir=str(tmp_path / "models"))
    assert cfg.engine_cache_path == tmp_path / "models" / "engines"
    cfg.edge.engine_cache = str(tmp_path / "cache")
    assert cfg.engine_cache_path == tmp_path / "cache"
    ptycho = backend_options(cfg, "ptychonn", 7)
    assert (ptycho.kind, ptycho.version, ptycho.max_batch) == ("ptychonn", 7, cfg.edge.max_batch)
    assert ptycho.engine_cache == tmp_path / "cache" and ptycho.precision == "auto"
    assert backend_options(cfg, "braggnn", 7).max_batch >= 256  # one frame's peaks
    assert resolve_precision("auto", "ptychonn") == "fp16"
    assert resolve_precision("auto", "braggnn") == "fp32"
    assert resolve_precision("fp16", "braggnn") == "fp16"


def test_edge_configured_for_a_backend_this_host_lacks_does_not_start(tmp_path, no_gpu):
    from edgeloop.edge_pva.server import EdgeServer
    from tests.kit.env import random_prefix
    from tests.kit.servers import small_config

    cfg, _ = small_config(tmp_path, random_prefix("n"))
    cfg.edge.backend = "tensorrt"
    with pytest.raises(BackendUnavailable, match="'tensorrt' needs a CUDA GPU"):
        EdgeServer(cfg)
