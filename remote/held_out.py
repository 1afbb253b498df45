"""The training set of a labels file, and held-out losses computed where they are read, so
the retraining service can judge a returned model with its own figures instead of the
endpoint's."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from edgeloop import registry as reg
from edgeloop.config import TrainConfig
from edgeloop.models import kind as model_kind
from edgeloop.remote.training import LossFn, centre_loss, evaluate, ptycho_loss, split


def read_labels(path: str, sha256: str, kind: str) -> tuple[np.ndarray, tuple, LossFn]:
    """(inputs, targets, loss) of a labels file written by ``tasks.analyze`` for ``kind``,
    after checking its sha256."""
    data = Path(path).read_bytes()
    if reg.sha256_bytes(data) != sha256:
        raise ValueError(f"labels file {path} fails its checksum")
    spec = model_kind(kind)
    with h5py.File(path, "r") as f:
        if f.attrs.get("kind") != spec.name:
            raise ValueError(f"labels file {path} is for {f.attrs.get('kind')!r}, not {kind!r}")
        inputs = f["inputs"][()]
        if spec.name == "braggnn":
            return inputs, (f["center"][()],), centre_loss
        amp = f["amplitude"][()]
        weight = f["weight"][()] if "weight" in f else None
        return inputs, (amp, f["phase"][()]), ptycho_loss(weight, amp.shape[-2:])


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
