"""Inference backends and the model being served; validation before a model may serve."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgeloop.models import ModelKind

log = logging.getLogger(__name__)


class TorchBackend:
    """Eager torch on CPU (or the first CUDA device when present)."""

    name = "torch"

    def __init__(self, model: nn.Module):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            out = self.model(torch.from_numpy(batch).to(self.device))
        return tuple(o.float().cpu().numpy() for o in out)


BACKENDS = {"torch": TorchBackend}


def make_backend(name: str, model: nn.Module):
    try:
        return BACKENDS[name](model)
    except KeyError:
        raise ValueError(f"unknown inference backend {name!r}; known: {sorted(BACKENDS)}") \
            from None


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


def validate(served: ServedModel, probe_frames: list[np.ndarray]) -> None:
    """A probe batch must run and give finite outputs of the declared shape and range."""
    try:
        outs = served.infer(probe_frames)
    except Exception as exc:
        raise ModelRejected(f"probe batch failed: {type(exc).__name__}: {exc}") from exc
    n, size = len(probe_frames), served.input_size
    if len(outs) != len(served.spec.outputs):
        raise ModelRejected(f"model gives {len(outs)} outputs, {served.spec.name} needs "
                            f"{len(served.spec.outputs)}")
    for name, out in zip(served.spec.outputs, outs):
        if out.shape != (n, 1, size, size):
            raise ModelRejected(f"{name} output shape {out.shape} != {(n, 1, size, size)}")
        if not np.all(np.isfinite(out)):
            raise ModelRejected(f"{name} output has NaN or Inf")
    amplitude, phase = outs
    if amplitude.min() < 0 or amplitude.max() > 1 or np.abs(phase).max() > np.pi + 1e-4:
        raise ModelRejected("outputs outside declared ranges (amplitude 0..1, phase +/-pi)")


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
