"""What every inference backend shares: the options it is built with, the error for one this
host cannot run, and the checks for what the GPU backends need."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeloop.models import KINDS
from edgeloop.registry import ModelUnavailable

# tensorrt: the largest batch an engine is built for; a bigger one runs in pieces.  A
# PtychoNN batch is at most edge.max_batch frames; a BraggNN batch is one frame's peaks (up to
# edge.max_peaks_per_frame), tiny 11x11 patches
BRAGGNN_MAX_BATCH = 512
TENSORRT_MIN_MAJOR = 10  # execute_async_v3, strongly typed networks, named I/O tensors


class BackendUnavailable(ModelUnavailable, ImportError):
    """The configured backend cannot run here (no GPU, a package missing, an engine that
    does not build).  Never the model's fault: like an unreadable model file it rejects no
    registry version, and the model being served keeps serving.  An ImportError too, so that
    code which leaves out backends whose package is missing leaves these out as well."""


@dataclass(frozen=True)
class BackendOptions:
    """What a backend needs beyond the network (the CPU backends use none of it)."""

    kind: str = ""  # model kind (ptychonn, braggnn); "": told by the network's class
    version: int = 0  # registry version: part of the engine-cache key and file names
    precision: str = "auto"  # "fp16", "fp32", "auto" (tolerance.AUTO_PRECISION)
    # tensorrt: the engine's largest batch; None: edge.max_batch's default for PtychoNN,
    # BRAGGNN_MAX_BATCH for BraggNN
    max_batch: int | None = None
    engine_cache: Path | None = None  # tensorrt: None: Config()'s default place


def kind_of(model: torch.nn.Module, kind: str = "") -> str:
    """The model kind of a network: ``kind`` when given, else the one whose class it is."""
    if kind:
        return kind
    for name, spec in KINDS.items():
        if isinstance(spec.build, type) and isinstance(model, spec.build):
            return name
    raise ValueError(f"{type(model).__name__} is no known model kind; pass its kind")


def _cuda_missing() -> str | None:
    if torch.cuda.is_available():
        return None
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (
        "a CUDA GPU; torch.cuda.is_available() is False on this host "
        f"(torch {torch.__version__}, {build})"
    )


def _tensorrt_missing() -> str | None:
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        return (
            f"NVIDIA's tensorrt package >= {TENSORRT_MIN_MAJOR} (pip install "
            f"'edgeloop[tensorrt]', on a host with an NVIDIA GPU); it does not import here: {exc}"
        )
    major = int(str(trt.__version__).split(".")[0])
    if major < TENSORRT_MIN_MAJOR:
        return f"TensorRT >= {TENSORRT_MIN_MAJOR}; found {trt.__version__}"
    return None


def gpu_missing(backend: str, tensorrt: bool = False) -> str | None:
    """Why GPU backend ``backend`` cannot run here (each missing thing), or None."""
    checks = (_cuda_missing, _tensorrt_missing) if tensorrt else (_cuda_missing,)
    missing = [reason for reason in (check() for check in checks) if reason]
    if not missing:
        return None
    return f"edge.backend {backend!r} needs " + "; and ".join(missing)


def cuda_device(backend: str) -> torch.device:
    """The CUDA device a GPU backend runs on; BackendUnavailable where there is none."""
    reason = gpu_missing(backend)
    if reason:
        raise BackendUnavailable(reason)
    return torch.device("cuda", torch.cuda.current_device())
