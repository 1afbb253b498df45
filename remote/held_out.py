"""The training set of a labels file, and held-out losses computed where they are read, so
the retraining service can judge a returned model with its own figures instead of the
endpoint's."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from edgeloop import registry as reg
from edgeloop.config import TrainConfig
from edgeloop.models import kind as model_kind
from edgeloop.remote.physics import training_set
from edgeloop.remote.training import LossFn, centre_loss, evaluate, ptycho_loss, split


@contextmanager
def _checked(path: str, sha256: str, kind: str, what: str):
    """The HDF5 file at ``path``, open, once its sha256 and its ``kind`` are the expected."""
    if reg.sha256_bytes(Path(path).read_bytes()) != sha256:
        raise ValueError(f"{what} {path} fails its checksum")
    with h5py.File(path, "r") as f:
        if f.attrs.get("kind") != kind:
            raise ValueError(f"{what} {path} is for {f.attrs.get('kind')!r}, not {kind!r}")
        yield f


def read_labels(path: str, sha256: str, kind: str) -> tuple[np.ndarray, tuple, LossFn]:
    """(inputs, targets, loss) of a labels file written by ``tasks.analyze`` for ``kind``,
    after checking its sha256."""
    spec = model_kind(kind)
    with _checked(path, sha256, spec.name, "labels file") as f:
        inputs = f["inputs"][()]
        if spec.name == "braggnn":
            return inputs, (f["center"][()],), centre_loss
        amp = f["amplitude"][()]
        weight = f["weight"][()] if "weight" in f else None
        return inputs, (amp, f["phase"][()]), ptycho_loss(weight, amp.shape[-2:])


def read_training_set(
    path: str, sha256: str, kind: str, cfg: TrainConfig
) -> tuple[np.ndarray, tuple, LossFn]:
    """(inputs, targets, loss) that ``train()`` minimises for ``cfg.loss``: a labels file as
    :func:`read_labels` reads it; with the physics loss (PtychoNN only) the measured moduli,
    each frame's partner (its nearest neighbour of the scan, within half a frame) and the
    shift to it join the targets, read from a labels file (``both``) or from a file of
    frames without labels (``physics``: ``tasks.prepare_frames``)."""
    if cfg.loss == "labels":
        return read_labels(path, sha256, kind)
    if kind != "ptychonn":
        raise ValueError(f"the {cfg.loss!r} loss is PtychoNN's; {kind} trains on labels")
    with _checked(path, sha256, kind, "training file") as f:
        missing = [k for k in ("inputs", "positions_px", "scan", "probe") if k not in f]
        if cfg.loss == "both":
            missing += [k for k in ("amplitude", "phase") if k not in f]
        if missing:
            raise ValueError(
                f"training file {path} lacks {', '.join(missing)} for the {cfg.loss!r} loss"
            )
        inputs, positions = f["inputs"][()], f["positions_px"][()]
        scans, probe = f["scan"][()], f["probe"][()]
        labels = (f["amplitude"][()], f["phase"][()]) if cfg.loss == "both" else ()
    return training_set(inputs, positions, scans, probe, cfg, labels)


def held_out_losses(
    models: dict[str, nn.Module | None],
    labels: str,
    sha256: str,
    kind: str,
    train: TrainConfig,
    batch: int = 64,
) -> dict[str, float | None]:
    """The loss of each model on the held-out split train() uses (``split(n, val_fraction,
    seed)``), in batches on one thread; None for a model that is None."""
    inputs, targets, loss = read_labels(labels, sha256, kind)
    _, val_idx = split(len(inputs), train.val_fraction, train.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for name, model in models.items():
            if model is None:
                out[name] = None
                continue
            total = 0.0
            for start in range(0, len(val_idx), batch):
                idx = val_idx[start : start + batch]
                total += evaluate(model, inputs, targets, loss, idx) * len(idx)
            out[name] = total / len(val_idx)
        return out
    finally:
        torch.set_num_threads(threads)
