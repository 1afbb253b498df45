"""Training loop shared by the model kinds: Adam, a cyclic or cosine learning rate, 10 % held
out for validation, the epoch with the lowest validation loss kept (the PtychoNN / BraggNN
edge training workflow).  Each kind brings its loss."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from edgeloop.config import TrainConfig

log = logging.getLogger(__name__)

LossFn = Callable[[tuple[torch.Tensor, ...], Sequence[torch.Tensor]], torch.Tensor]


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise ValueError(f"need at least 2 samples to train with a validation split, got {n}")
    return idx[n_val:], idx[:n_val]


def ptycho_loss(weight: np.ndarray | None, shape: tuple[int, int]) -> LossFn:
    """Mean absolute error of amplitude and phase, weighted per pixel by ``weight``: a frame
    only carries information where the probe lit the sample, so labels elsewhere are not
    learnable from it."""
    w = torch.ones(shape) if weight is None else torch.as_tensor(weight).float()
    w = w / w.mean()

    def loss(outputs, targets):
        (pa, pp), (amp, phase) = outputs, targets
        return (((pa[:, 0] - amp).abs() + (pp[:, 0] - phase).abs()) * w).mean()

    return loss


def centre_loss(outputs, targets) -> torch.Tensor:
    """BraggNN: mean squared error of the (x, y) centre in patch units."""
    return nn.functional.mse_loss(outputs[0], targets[0])


def epochs_for(cfg: TrainConfig, n_train: int) -> int:
    """The epochs of one run: ``cfg.epochs``, or, continuing from a checkpoint with a sample
    budget, as many as the budget allows over ``n_train`` samples (at least 3)."""
    if not (cfg.keep_initial and cfg.sample_budget):
        return cfg.epochs
    return max(3, min(cfg.epochs, -(-cfg.sample_budget // max(n_train, 1))))


def _scheduler(opt, cfg: TrainConfig, steps_per_epoch: int, epochs: int):
    """Stepped once per batch."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(1, epochs * steps_per_epoch), eta_min=cfg.lr_min
        )
    if cfg.schedule == "cyclic":
        return torch.optim.lr_scheduler.CyclicLR(
            opt,
            base_lr=cfg.lr_min,
            max_lr=cfg.lr,
            step_size_up=max(1, 3 * steps_per_epoch),
            cycle_momentum=False,
            mode="triangular2",
        )
    raise ValueError(f"unknown learning-rate schedule {cfg.schedule!r}: cyclic or cosine")


def with_partners(loss_fn: LossFn, idx: torch.Tensor) -> torch.Tensor:
    """The samples of a batch, followed by their partners where the loss pairs frames
    (remote/physics.py: neighbouring scan points)."""
    partners = getattr(loss_fn, "partners", None)
    return idx if partners is None else torch.cat([idx, torch.from_numpy(partners)[idx]])


def evaluate(
    model: nn.Module,
    inputs: np.ndarray,
    targets: Sequence[np.ndarray],
    loss_fn: LossFn,
    idx: np.ndarray,
) -> float:
    """The loss of a model on the samples ``idx`` (e.g. the held-out split)."""
    model.eval()
    i = with_partners(loss_fn, torch.from_numpy(np.asarray(idx)))
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(inputs, np.float32))[i]
        ys = [torch.from_numpy(np.ascontiguousarray(t, np.float32))[i] for t in targets]
        return float(loss_fn(model(x), ys).item())


def _epoch(step, x, ys, order, batch_size: int, over_budget) -> tuple[float, bool]:
    """One pass of ``step`` (model, loss, optimiser, scheduler) over the samples ``order`` in
    batches: (the summed loss of its samples, whether ``over_budget()`` ended it early)."""
    model, loss_fn, opt, sched = step
    model.train()
    total = 0.0
    for start in range(0, len(order), batch_size):
        b = order[start : start + batch_size]
        if len(b) < 2:  # batch norm needs two samples
            continue
        n_b = len(b)
        b = with_partners(loss_fn, b)
        opt.zero_grad()
        loss = loss_fn(model(x[b]), [y[b] for y in ys])
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * n_b
        if over_budget():
            return total, True
    return total, False


def train(
    model: nn.Module,
    inputs: np.ndarray,
    targets: Sequence[np.ndarray],
    loss_fn: LossFn,
    cfg: TrainConfig,
    progress=None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[nn.Module, float, list[dict]]:
    """Train in place from the given weights; returns (best model, best val loss, history).
    With ``cfg.time_budget_s`` the run ends at the first batch past the budget by ``clock``
    (wall time; ``time.process_time`` compares trainings at equal CPU time), after that
    epoch's validation."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    train_idx, val_idx = split(len(inputs), cfg.val_fraction, cfg.seed)
    x = torch.from_numpy(np.ascontiguousarray(inputs, np.float32))
    ys = [torch.from_numpy(np.ascontiguousarray(t, np.float32)) for t in targets]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = max(1, int(np.ceil(len(train_idx) / cfg.batch_size)))
    epochs = epochs_for(cfg, len(train_idx))
    sched = _scheduler(opt, cfg, steps, epochs)
    # continuing from a checkpoint: never hand back a model worse than the one we started from
    best_loss, best_state, history = float("inf"), None, []
    if cfg.keep_initial:
        best_loss = evaluate(model, inputs, targets, loss_fn, val_idx)
        best_state = copy.deepcopy(model.state_dict())
    vi = with_partners(loss_fn, torch.from_numpy(val_idx))
    t_start = clock()

    def over_budget() -> bool:
        return bool(cfg.time_budget_s) and clock() - t_start > cfg.time_budget_s

    step = (model, loss_fn, opt, sched)
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = torch.from_numpy(np.random.default_rng(cfg.seed + epoch).permutation(train_idx))
        total, out_of_time = _epoch(step, x, ys, order, cfg.batch_size, over_budget)
        model.eval()
        with torch.no_grad():
            val = loss_fn(model(x[vi]), [y[vi] for y in ys]).item()
        train_loss, seconds = total / len(train_idx), time.perf_counter() - t0
        history.append(
            {"epoch": epoch, "train_loss": train_loss, "val_loss": val, "seconds": seconds}
        )
        if val < best_loss:
            best_loss, best_state = val, copy.deepcopy(model.state_dict())
        log.info("epoch %d/%d train %.5f val %.5f", epoch + 1, epochs, train_loss, val)
        if progress is not None:
            progress(epoch + 1, epochs, val)
        if out_of_time:
            log.info(
                "training time budget %.0f s spent after %d epochs", cfg.time_budget_s, epoch + 1
            )
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), best_loss, history
