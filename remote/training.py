"""Training PtychoNN (Adam, mean absolute error, cyclic learning rate, 10 % validation,
lowest validation loss kept), as in the PtychoNN edge-training workflow."""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch
from torch import nn

from edgeloop.config import TrainConfig

log = logging.getLogger(__name__)


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise ValueError(f"need at least 2 frames to train with a validation split, got {n}")
    return idx[n_val:], idx[:n_val]


def _loss(model, x, amp, phase, weight) -> torch.Tensor:
    pa, pp = model(x)
    return (((pa[:, 0] - amp).abs() + (pp[:, 0] - phase).abs()) * weight).mean()


def train(model: nn.Module, inputs: np.ndarray, amplitude: np.ndarray, phase: np.ndarray,
          cfg: TrainConfig, weight: np.ndarray | None = None, progress=None
          ) -> tuple[nn.Module, float, list[dict]]:
    """Train in place from the given weights; returns (best model, best val loss, history).

    ``weight`` (M, M) weighs the absolute error per pixel: a frame only carries information
    where the probe illuminated the sample, so the labels elsewhere are not learnable from it.
    """
    torch.manual_seed(cfg.seed)
    w = torch.ones(amplitude.shape[-2:]) if weight is None else torch.as_tensor(weight).float()
    w = w / w.mean()
    torch.set_num_threads(cfg.threads)
    train_idx, val_idx = split(len(inputs), cfg.val_fraction, cfg.seed)
    x = torch.from_numpy(np.ascontiguousarray(inputs, np.float32))
    a = torch.from_numpy(np.ascontiguousarray(amplitude, np.float32))
    p = torch.from_numpy(np.ascontiguousarray(phase, np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = max(1, int(np.ceil(len(train_idx) / cfg.batch_size)))
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=cfg.lr_min, max_lr=cfg.lr,
                                              step_size_up=max(1, 3 * steps),
                                              cycle_momentum=False, mode="triangular2")
    best_loss, best_state, history = float("inf"), None, []
    vi = torch.from_numpy(val_idx)
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.from_numpy(np.random.default_rng(cfg.seed + epoch).permutation(train_idx))
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            b = order[start:start + cfg.batch_size]
            opt.zero_grad()
            loss = _loss(model, x[b], a[b], p[b], w)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        model.eval()
        with torch.no_grad():
            val = _loss(model, x[vi], a[vi], p[vi], w).item()
        history.append({"epoch": epoch, "train_loss": total / len(train_idx), "val_loss": val,
                        "seconds": time.perf_counter() - t0})
        if val < best_loss:
            best_loss, best_state = val, copy.deepcopy(model.state_dict())
        log.info("epoch %d/%d train %.4f val %.4f", epoch + 1, cfg.epochs,
                 history[-1]["train_loss"], val)
        if progress is not None:
            progress(epoch + 1, cfg.epochs, val)
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), best_loss, history
