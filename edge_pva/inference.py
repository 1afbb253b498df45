"""Inference backends and the model being served; validation before a model may serve.

Backends by name (edge.backend): ``torch`` (eager, CPU), ``onnxruntime`` (CPU), ``torch-cuda``
(eager on an NVIDIA GPU, fp16 where tolerance.AUTO_PRECISION says), ``tensorrt``
(tensorrt_backend.py), and ``auto``: onnxruntime where it is installed, else torch (on
CPU onnxruntime runs the same network 1.5-2.6x faster).  Each takes any batch size and gives
the same outputs as torch on the CPU within tolerance.TOLERANCES.  One that cannot run here
raises BackendUnavailable when it is built, naming what is missing, so a model load fails
with that reason and the model being served keeps serving.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass

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
from edgeloop.edge_pva.tensorrt_backend import TensorRTBackend
from edgeloop.edge_pva.tolerance import resolve_precision
from edgeloop.models import ModelKind
from edgeloop.models import kind as model_kind
from edgeloop.onnx_export import INPUT, export_onnx
from edgeloop.optional import require
from edgeloop.registry import is_transient

log = logging.getLogger(__name__)

__all__ = [  # what the edge, the apps and the benchmarks take from here
    "BACKENDS",
    "BackendOptions",
    "BackendUnavailable",
    "ModelRejected",
    "ModelSlot",
    "ServedModel",
    "backend_options",
    "check_backend",
    "make_backend",
    "probe_inputs",
    "served_model",
    "unavailable_reason",
    "untrained_model",
    "validate",
]


class TorchBackend:
    """Eager torch on the CPU, always (a GPU is the torch-cuda backend's).  Takes any batch
    size; its CPU threads are process-wide (``torch.set_num_threads``, set from
    edge.threads)."""

    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        input_size: int | None = None,
        threads: int | None = None,
        options: BackendOptions | None = None,
    ):
        self.device = torch.device("cpu")
        self.model = model.to(self.device).eval()

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(batch, np.float32)))
        return tuple(o.float().numpy() for o in out)


class OnnxBackend:
    """onnxruntime on CPU: the network exported to ONNX in memory when it is loaded.  For
    BraggNN's small tensors it is about twice as fast per peak as eager torch."""

    name = "onnxruntime"

    def __init__(
        self,
        model: nn.Module,
        input_size: int,
        threads: int = 1,
        options: BackendOptions | None = None,
    ):
        check_backend(self.name)
        ort = require("onnxruntime", "onnx")
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads
        session_options.inter_op_num_threads = 1
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            export_onnx(model, input_size), session_options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(None, {INPUT: np.ascontiguousarray(batch, np.float32)}))


class TorchCudaBackend:
    """Eager torch on the first CUDA device, in fp16 or fp32 (edge.precision; "auto": the
    model kind's, tolerance.AUTO_PRECISION).  fp32 is IEEE fp32: TF32 convolutions are
    turned off for the process.  Inputs and outputs stay float32 on the host."""

    name = "torch-cuda"

    def __init__(
        self,
        model: nn.Module,
        input_size: int,
        threads: int = 1,
        options: BackendOptions | None = None,
    ):
        options = options or BackendOptions()
        self.device = cuda_device(self.name)
        self.precision = resolve_precision(options.precision, kind_of(model, options.kind))
        self.dtype = torch.float16 if self.precision == "fp16" else torch.float32
        if self.precision == "fp32":
            torch.backends.cudnn.allow_tf32 = False
        # a copy: the caller's network stays on the CPU in fp32
        self.model = copy.deepcopy(model).to(self.device, self.dtype).eval()

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.inference_mode(), torch.cuda.device(self.device):
            x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device)
            out = self.model(x.to(self.dtype))
            return tuple(o.float().cpu().numpy() for o in out)


BACKENDS = {
    "torch": TorchBackend,
    "onnxruntime": OnnxBackend,
    "torch-cuda": TorchCudaBackend,
    "tensorrt": TensorRTBackend,
}


def resolve_backend(name: str) -> str:
    """The backend ``name`` stands for here: ``auto`` is onnxruntime where it can run."""
    if name != "auto":
        return name
    return "onnxruntime" if unavailable_reason("onnxruntime") is None else "torch"


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this host (every missing thing), or None."""
    if name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"unknown inference backend {name!r}; known: {sorted(BACKENDS)}")
    if name == "onnxruntime":
        for module in ("onnx", "onnxruntime"):
            try:
                require(module, "onnx")
            except ImportError as exc:
                return f"edge.backend 'onnxruntime' cannot run here: {exc}"
    if name in ("torch-cuda", "tensorrt"):
        return gpu_missing(name, tensorrt=name == "tensorrt")
    return None


def check_backend(name: str) -> None:
    """Raise BackendUnavailable (with the reason) if backend ``name`` cannot run here: what
    an edge checks before it loads any model."""
    reason = unavailable_reason(name)
    if reason:
        raise BackendUnavailable(reason)


def backend_options(cfg: Config, kind: str, version: int) -> BackendOptions:
    """The options a backend for ``kind``'s registry ``version`` is built with on an edge
    configured by ``cfg``."""
    return BackendOptions(
        kind=kind,
        version=version,
        precision=cfg.edge.precision,
        max_batch=cfg.edge.max_batch if kind == "ptychonn" else BRAGGNN_MAX_BATCH,
        engine_cache=cfg.engine_cache_path,
    )


def make_backend(
    name: str,
    model: nn.Module,
    input_size: int,
    threads: int = 1,
    options: BackendOptions | None = None,
):
    """Backend ``name`` for ``model``; BackendUnavailable where it cannot run here."""
    try:
        backend = BACKENDS[resolve_backend(name)]
    except KeyError:
        raise ValueError(
            f"unknown inference backend {name!r}; known: {sorted(BACKENDS)}"
        ) from None
    return backend(model, input_size, threads, options)


class ModelRejected(RuntimeError):
    pass


@dataclass
class ServedModel:
    version: int
    spec: ModelKind
    input_size: int
    backend: object

    def infer(self, frames: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        return self.backend(self.spec.preprocess(frames, self.input_size))


def served_model(cfg: Config, kind: str, version: int, model: nn.Module) -> ServedModel:
    """``model``, registry ``version`` of ``kind``, on the backend ``cfg`` names."""
    size = cfg.input_size(kind)
    backend = make_backend(
        cfg.edge.backend, model, size, cfg.edge.threads, backend_options(cfg, kind, version)
    )
    return ServedModel(version, model_kind(kind), size, backend)


def untrained_model(cfg: Config, kind: str) -> ServedModel:
    """v0, what an edge serves while its registry holds no accepted model of ``kind``:
    untrained, seed 0, so the same weights in the edge, pvapy's baseline and the bench."""
    torch.manual_seed(0)
    return served_model(cfg, kind, 0, model_kind(kind).build(**cfg.arch(kind)))


def _check_ptychonn(outs, n: int, size: int) -> None:
    for name, out in zip(("amplitude", "phase"), outs):
        if out.shape != (n, 1, size, size):
            raise ModelRejected(f"{name} output shape {out.shape} != {(n, 1, size, size)}")
    amplitude, phase = outs
    if amplitude.min() < 0 or amplitude.max() > 1 or np.abs(phase).max() > np.pi + 1e-4:
        raise ModelRejected("outputs outside declared ranges (amplitude 0..1, phase +/-pi)")


def _check_braggnn(outs, n: int, size: int) -> None:
    (centre,) = outs
    if centre.shape != (n, 2):
        raise ModelRejected(f"center output shape {centre.shape} != {(n, 2)}")
    # centres are in patch units; a usable model keeps a peak near its patch
    if np.abs(centre - 0.5).max() > 1.0:
        raise ModelRejected(
            f"centres {centre.min():.2f}..{centre.max():.2f} patch widths, far outside the patch"
        )


_CHECKS = {"ptychonn": _check_ptychonn, "braggnn": _check_braggnn}


def validate(served: ServedModel, probe_inputs: list[np.ndarray]) -> None:
    """A probe batch (frames for PtychoNN, patches for BraggNN) must run and give finite
    outputs of the declared shape and range."""
    try:
        outs = served.infer(probe_inputs)
    except Exception as exc:
        if is_transient(exc):
            raise  # out of memory, say: not the model's fault (rejects nothing)
        raise ModelRejected(f"probe batch failed: {type(exc).__name__}: {exc}") from exc
    if len(outs) != len(served.spec.outputs):
        raise ModelRejected(
            f"model gives {len(outs)} outputs, {served.spec.name} needs {len(served.spec.outputs)}"
        )
    for name, out in zip(served.spec.outputs, outs):
        if not np.all(np.isfinite(out)):
            raise ModelRejected(f"{name} output has NaN or Inf")
    _CHECKS[served.spec.name](outs, len(probe_inputs), served.input_size)


def probe_inputs(kind: str, size: int, recent: list[np.ndarray]) -> list[np.ndarray]:
    """What a candidate model is tried on before it serves: recent inputs of its kind, or
    made-up ones before any have arrived (noise frames; Gaussian spots in patches)."""
    if recent:
        return list(recent)
    rng = np.random.default_rng(0)
    if kind == "braggnn":
        yy, xx = np.mgrid[:size, :size]
        mid = (size - 1) / 2
        return [
            (20 + 1000 * np.exp(-((xx - mid - dx) ** 2 + (yy - mid + dx) ** 2) / 3)).astype(
                np.float32
            )
            for dx in (-1.0, 0.0, 1.0)
        ]
    return [rng.poisson(50.0, (size, size)).astype(np.float32) for _ in range(2)]


class ModelSlot:
    """One reference to the serving model; swapped atomically between batches."""

    def __init__(self, served: ServedModel):
        self._served = served
        self._lock = threading.Lock()

    def get(self) -> ServedModel:
        with self._lock:
            return self._served

    def swap(self, served: ServedModel) -> ServedModel:
        with self._lock:
            old, self._served = self._served, served
        return old
