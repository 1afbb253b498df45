"""Inference backends and the model being served; validation before a model may serve."""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgeloop.models import ModelKind
from edgeloop.optional import require

log = logging.getLogger(__name__)


class TorchBackend:
    """Eager torch on CPU (or the first CUDA device when present).  Takes any batch size;
    its CPU threads are process-wide (``torch.set_num_threads``, set from edge.threads)."""

    name = "torch"

    def __init__(
        self, model: nn.Module, input_size: int | None = None, threads: int | None = None
    ):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            out = self.model(torch.from_numpy(batch).to(self.device))
        return tuple(o.float().cpu().numpy() for o in out)


class OnnxBackend:
    """onnxruntime on CPU: the network exported to ONNX in memory when it is loaded.  For
    BraggNN's small tensors it is about twice as fast per peak as eager torch."""

    name = "onnxruntime"

    def __init__(self, model: nn.Module, input_size: int, threads: int = 1):
        require("onnx", "onnx")  # torch.onnx.export needs it
        ort = require("onnxruntime", "onnx")

        buf = io.BytesIO()
        example = torch.zeros(2, 1, input_size, input_size)
        with torch.no_grad():
            n_out = len(model.eval()(example))
        torch.onnx.export(
            model,
            (example,),
            buf,
            input_names=["x"],
            output_names=[f"y{i}" for i in range(n_out)],
            dynamic_axes={"x": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            buf.getvalue(), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(None, {"x": np.ascontiguousarray(batch, np.float32)}))


BACKENDS = {"torch": TorchBackend, "onnxruntime": OnnxBackend}


def make_backend(name: str, model: nn.Module, input_size: int, threads: int = 1):
    try:
        backend = BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown inference backend {name!r}; known: {sorted(BACKENDS)}"
        ) from None
    return backend(model, input_size, threads)


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
