"""The tensorrt backend: the network exported to ONNX, a TensorRT engine built from it when
the model is loaded (before it serves, never on the frame path), cached on disk, and run
through the CUDA runtime with torch tensors holding the buffers (no pycuda).

Engine cache (edge.engine_cache, default <registry_dir>/engines): one engine per
:class:`EngineKey` — the ONNX graph's sha256, model kind and version, TensorRT version, GPU
name and compute capability, precision, input size and batch profile — beside a .json that
records the key and the engine's sha256, and the ONNX file it was built from.  An engine
whose record does not match, or that TensorRT cannot deserialize, is built again.  Nothing
prunes the cache: each accepted model version adds one engine per GPU kind (a few MB).

The network is strongly typed: its precision is the ONNX graph's (onnx_export), as
TensorRT 11 requires; in fp32 TF32 is turned off, so fp32 means IEEE fp32.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from edgeloop.config import Config
from edgeloop.edge_pva.backend_base import (
    BRAGGNN_MAX_BATCH,
    BackendOptions,
    BackendUnavailable,
    cuda_device,
    gpu_missing,
    kind_of,
)
from edgeloop.edge_pva.tolerance import resolve_precision
from edgeloop.onnx_export import INPUT, export_onnx
from edgeloop.registry import atomic_write, sha256_bytes

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 1 << 30  # the builder's scratch memory limit

Engine = TypeVar("Engine")


# ---- the cache: pure functions and a load-or-build that takes the TensorRT calls ---------
@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; any change means another engine."""

    onnx_sha256: str
    kind: str
    version: int
    tensorrt: str  # tensorrt.__version__
    gpu: str  # torch.cuda.get_device_name
    compute_capability: str  # "9.0"
    precision: str  # "fp16" / "fp32"
    input_size: int
    batch_profile: tuple[int, int, int]  # min, opt, max batch

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["batch_profile"] = list(self.batch_profile)
        return record

    def digest(self) -> str:
        """sha256 of the key's canonical JSON."""
        return sha256_bytes(json.dumps(self.to_dict(), sort_keys=True).encode())


@dataclass(frozen=True)
class EnginePaths:
    engine: Path
    record: Path  # the key and the engine's sha256 (JSON)
    onnx: Path  # the graph the engine was built from


def batch_profile(max_batch: int) -> tuple[int, int, int]:
    """(min, opt, max) batch of the engine's optimisation profile: any batch from 1 up to
    ``max_batch``, tuned for the largest (a busy edge batches as much as it may)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return (1, max_batch, max_batch)


def engine_paths(cache_dir: Path, key: EngineKey) -> EnginePaths:
    """Where ``key``'s engine lives: named by kind, version and precision (to be found by
    eye) and the key's digest (to be told apart)."""
    stem = f"{key.kind}-v{key.version:04d}-{key.precision}"
    digest = key.digest()[:20]
    return EnginePaths(
        engine=cache_dir / f"{stem}-{digest}.engine",
        record=cache_dir / f"{stem}-{digest}.json",
        onnx=cache_dir / f"{stem}-{key.onnx_sha256[:20]}.onnx",
    )


def _cached(paths: EnginePaths, key: EngineKey, deserialize) -> tuple[object | None, str]:
    """(engine, "") from the cache, or (None, why not)."""
    if not paths.engine.exists():
        return None, ""
    try:
        data = paths.engine.read_bytes()
        record = json.loads(paths.record.read_text())
    except (OSError, ValueError) as exc:
        return None, f"unreadable: {type(exc).__name__}: {exc}"
    if record.get("key") != key.to_dict():
        return None, "its record names another key"
    if record.get("engine_sha256") != sha256_bytes(data):
        return None, "its checksum does not match its record (truncated or changed)"
    try:
        engine = deserialize(data)
    except Exception as exc:  # TensorRT raises what it likes for a bad plan
        return None, f"TensorRT could not deserialize it: {type(exc).__name__}: {exc}"
    if engine is None:
        return None, "TensorRT could not deserialize it"
    return engine, ""


def load_or_build(
    paths: EnginePaths,
    key: EngineKey,
    build: Callable[[], bytes],
    deserialize: Callable[[bytes], Engine | None],
) -> tuple[Engine, str]:
    """The engine for ``key``: from the cache when it is there and sound, else built,
    stored and returned.  Returns (engine, "cached" | "built" | "rebuilt")."""
    engine, problem = _cached(paths, key, deserialize)
    if engine is not None:
        return engine, "cached"
    if problem:
        log.warning("engine cache %s unusable (%s): building it again", paths.engine, problem)
    data = build()
    engine = deserialize(data)
    if engine is None:
        raise BackendUnavailable("TensorRT could not deserialize the engine it had just built")
    record = {"key": key.to_dict(), "engine_sha256": sha256_bytes(data)}
    try:
        atomic_write(paths.engine, data)  # the engine first: a reader in between sees
        atomic_write(paths.record, json.dumps(record, indent=2).encode())  # a mismatch
    except OSError as exc:
        log.warning("engine cache %s not written (%s); serving the engine anyway", paths, exc)
    return engine, "rebuilt" if problem else "built"


# ---- TensorRT ----------------------------------------------------------------------------
def _logger(trt):
    """TensorRT's messages into this logger (verbose ones dropped, info at debug)."""
    severity = trt.ILogger.Severity
    levels = {
        severity.INTERNAL_ERROR: logging.ERROR,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.DEBUG,
    }

    class _Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, sev, msg):
            level = levels.get(sev)
            if level is None:
                return
            if level >= logging.ERROR:
                self.errors.append(msg)
            log.log(level, "TensorRT: %s", msg)

    return _Log()


def build_engine(
    trt, logger, onnx: bytes, input_size: int, profile: tuple[int, int, int], precision: str
) -> bytes:
    """A serialized engine from ONNX bytes (takes seconds to minutes; releases the GIL)."""
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # TensorRT 10; 11 is strongly typed always
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailable(f"TensorRT's ONNX parser refused the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if precision == "fp32" and tf32 is not None:
        config.clear_flag(tf32)
    shapes = [(b, 1, input_size, input_size) for b in profile]
    opt = builder.create_optimization_profile()
    opt.set_shape(INPUT, *shapes)
    config.add_optimization_profile(opt)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        errors = "; ".join(getattr(logger, "errors", [])[-3:]) or "see the log"
        raise BackendUnavailable(f"TensorRT could not build an engine: {errors}")
    return bytes(plan)


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
    if dtype not in table:
        raise BackendUnavailable(f"engine tensor of type {dtype} is not handled here")
    return table[dtype]


class TensorRTBackend:
    """A TensorRT engine (see the module doc); any batch size, bigger batches than the
    engine's profile in pieces.  Needs an NVIDIA GPU and the tensorrt package (>= 10)."""

    name = "tensorrt"

    def __init__(
        self,
        model: nn.Module,
        input_size: int,
        threads: int = 1,
        options: BackendOptions | None = None,
    ):
        options = options or BackendOptions()
        missing = gpu_missing(self.name, tensorrt=True)
        if missing:
            raise BackendUnavailable(missing)
        import tensorrt as trt

        self.device = cuda_device(self.name)
        kind = kind_of(model, options.kind)
        self.precision = resolve_precision(options.precision, kind)
        onnx = export_onnx(model, input_size, self.precision)
        default_batch = BRAGGNN_MAX_BATCH if kind == "braggnn" else Config().edge.max_batch
        self.profile = batch_profile(options.max_batch or default_batch)
        key = EngineKey(
            onnx_sha256=sha256_bytes(onnx),
            kind=kind,
            version=options.version,
            tensorrt=str(trt.__version__),
            gpu=torch.cuda.get_device_name(self.device),
            compute_capability="{}.{}".format(*torch.cuda.get_device_capability(self.device)),
            precision=self.precision,
            input_size=input_size,
            batch_profile=self.profile,
        )
        cache = options.engine_cache or Config().engine_cache_path
        paths = engine_paths(Path(cache), key)
        if not paths.onnx.exists():
            try:
                atomic_write(paths.onnx, onnx)
            except OSError as exc:
                log.warning("ONNX graph %s not written: %s", paths.onnx, exc)
        self._logger = _logger(trt)
        self._runtime = trt.Runtime(self._logger)  # outlives the engine it deserialized

        def build() -> bytes:
            return build_engine(trt, self._logger, onnx, input_size, self.profile, self.precision)

        with torch.cuda.device(self.device):
            self.engine, how = load_or_build(
                paths, key, build, self._runtime.deserialize_cuda_engine
            )
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        log.info("tensorrt engine %s (%s) for %s v%d", paths.engine.name, how, kind, key.version)
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [INPUT]:
            raise BackendUnavailable(f"engine inputs {inputs}, expected [{INPUT!r}]")
        self.in_dtype = _torch_dtype(trt, engine.get_tensor_dtype(INPUT))
        self.outputs = [  # (name, dtype, shape with -1 for the batch)
            (n, _torch_dtype(trt, engine.get_tensor_dtype(n)), tuple(engine.get_tensor_shape(n)))
            for n in names
            if n != INPUT
        ]

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        if len(batch) == 0:
            return tuple(np.zeros((0, *shape[1:]), np.float32) for _, _, shape in self.outputs)
        top = self.profile[2]
        pieces = [self._run(batch[i : i + top]) for i in range(0, len(batch), top)]
        if len(pieces) == 1:
            return pieces[0]
        return tuple(np.concatenate(parts) for parts in zip(*pieces))

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        ctx = self.context
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device)
            x = x.to(self.in_dtype)
            if not ctx.set_input_shape(INPUT, tuple(x.shape)):
                raise RuntimeError(f"TensorRT refused input shape {tuple(x.shape)}")
            ctx.set_tensor_address(INPUT, x.data_ptr())
            outs = []
            for name, dtype, _ in self.outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                out = torch.empty(shape, dtype=dtype, device=self.device)
                ctx.set_tensor_address(name, out.data_ptr())
                outs.append(out)
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed (see the log)")
            # .cpu() waits for the stream: the copies are queued behind the engine
            return tuple(o.float().cpu().numpy() for o in outs)
