"""Network definitions, imported by both the edge server and the retraining task.

A *model kind* bundles a network builder with the preprocessing that brings detector frames
to its input.  Kinds are looked up by name in ``KINDS``; a new technique adds an entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


def _block(cin: int, cout: int) -> list[nn.Module]:
    # batch norm: trains from random weights in the few epochs a CPU retraining allows
    return [
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.01),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.01),
    ]


class PtychoNN(nn.Module):
    """PtychoNN (Cherukara et al. 2020): one encoder, two decoders (amplitude, phase).

    Input (B, 1, N, N) normalised diffraction; outputs amplitude in (0, 1) and phase in
    (-pi, pi), each (B, 1, N, N).  ``width=32`` is the published size (about 1.15 M
    parameters at N = 64).  ``skip=1``: U-Net decoders (Ronneberger et al. 2015), each
    upsampling step joined by the encoder's features at that scale (concatenated), the
    usual cure for fine detail lost in the bottleneck; same blocks and widths.
    """

    def __init__(self, width: int = 16, skip: int = 0):
        super().__init__()
        w = width
        self.skip = bool(skip)
        if self.skip:
            self.stages = nn.ModuleList(
                [nn.Sequential(*_block(1, w)), nn.Sequential(*_block(w, 2 * w)),
                 nn.Sequential(*_block(2 * w, 4 * w))]
            )  # fmt: skip
            self.amplitude = _SkipDecoder(w, nn.Sigmoid())
            self.phase = _SkipDecoder(w, nn.Tanh())
            return
        self.encoder = nn.Sequential(
            *_block(1, w),
            nn.MaxPool2d(2),
            *_block(w, 2 * w),
            nn.MaxPool2d(2),
            *_block(2 * w, 4 * w),
            nn.MaxPool2d(2),
        )
        self.amplitude = self._decoder(w, nn.Sigmoid())
        self.phase = self._decoder(w, nn.Tanh())

    @staticmethod
    def _decoder(w: int, out: nn.Module) -> nn.Sequential:
        return nn.Sequential(
            *_block(4 * w, 4 * w),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            *_block(4 * w, 2 * w),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            *_block(2 * w, w),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            nn.Conv2d(w, 1, 3, padding=1),
            out,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip:
            features = []
            for stage in self.stages:
                x = stage(x)
                features.append(x)  # at N, N/2, N/4
                x = nn.functional.max_pool2d(x, 2)
            return self.amplitude(x, features), self.phase(x, features) * np.pi
        z = self.encoder(x)
        return self.amplitude(z), self.phase(z) * np.pi


class _SkipDecoder(nn.Module):
    """PtychoNN's decoder with the encoder's features joined at each scale: the same blocks
    at the same scales (wider inputs only), the full-scale features joined before the last
    convolution, so its cost per frame stays near the plain decoder's."""

    def __init__(self, w: int, out: nn.Module):
        super().__init__()
        self.bottom = nn.Sequential(*_block(4 * w, 4 * w))
        self.ups = nn.ModuleList(
            [nn.Sequential(*_block(8 * w, 2 * w)), nn.Sequential(*_block(4 * w, w))]
        )
        self.head = nn.Sequential(nn.Conv2d(2 * w, 1, 3, padding=1), out)

    def forward(self, z: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.bottom(z)
        full, *coarse = features  # at N; at N/2, N/4
        for up, skip in zip(self.ups, reversed(coarse), strict=True):
            x = nn.functional.interpolate(x, scale_factor=2, mode="bilinear")
            x = up(torch.cat([x, skip], dim=1))
        x = nn.functional.interpolate(x, scale_factor=2, mode="bilinear")
        return self.head(torch.cat([x, full], dim=1))


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local (self-attention) block with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(channels // 2, 1)
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.out = nn.Sequential(nn.Conv2d(inner, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (B, HW, C')
        phi = self.phi(x).flatten(2)  # (B, C', HW)
        g = self.g(x).flatten(2).transpose(1, 2)  # (B, HW, C')
        attention = torch.softmax(theta @ phi, dim=-1)
        y = (attention @ g).transpose(1, 2).reshape(b, -1, h, w)
        return x + self.out(y)


class BraggNN(nn.Module):
    """BraggNN (Liu et al. 2022): conv + non-local attention + dense layers -> the sub-pixel
    peak centre (x, y) of a patch, in units of the patch size (0..1 across the patch).

    Input (B, 1, P, P) with P = ``patch`` (11 by default); about 45 k parameters at 11x11.
    """

    def __init__(self, patch: int = 11, width: int = 64):
        super().__init__()
        act = nn.LeakyReLU(0.01)
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3),
            NonLocalBlock(width),
            act,
            nn.Conv2d(width, width // 2, 3),
            act,
            nn.Conv2d(width // 2, 8, 3),
            act,
        )
        side = patch - 6
        if side < 1:
            raise ValueError(f"patch must be at least 7 pixels, got {patch}")
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(8 * side * side, 64),
            act,
            nn.Linear(64, 32),
            act,
            nn.Linear(32, 16),
            act,
            nn.Linear(16, 8),
            act,
            nn.Linear(8, 2),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.head(self.features(x)),)


def braggnn_preprocess(patches, size: int) -> np.ndarray:
    """Each patch scaled to 0..1 (min-max); patches (a list or an (n, P, P) array) must
    already be size x size."""
    stack = np.asarray(patches, np.float32)
    if stack.ndim != 3:
        raise ValueError(f"expected (n, {size}, {size}) patches, got shape {stack.shape}")
    if stack.shape[1:] != (size, size):
        raise ValueError(f"BraggNN takes {size}x{size} patches, got {stack.shape[1:]}")
    lo = stack.min(axis=(1, 2), keepdims=True)
    span = np.maximum(stack.max(axis=(1, 2), keepdims=True) - lo, 1e-6)
    return ((stack - lo) / span)[:, None]


def to_input_size(frame: np.ndarray, size: int) -> np.ndarray:
    """Bring a centred diffraction pattern to size x size: centre-crop to a multiple of
    ``size``, sum-bin by the integer factor; smaller frames are zero-padded."""
    ny, nx = frame.shape
    if ny < size or nx < size:
        out = np.zeros((max(ny, size), max(nx, size)), np.float32)
        oy, ox = (out.shape[0] - ny) // 2, (out.shape[1] - nx) // 2
        out[oy : oy + ny, ox : ox + nx] = frame
        frame, (ny, nx) = out, out.shape
    f = min(ny, nx) // size
    crop = size * f
    y0, x0 = (ny - crop) // 2, (nx - crop) // 2
    sub = frame[y0 : y0 + crop, x0 : x0 + crop]
    if f == 1:
        return sub.astype(np.float32, copy=False)
    # einsum sums in the frame's own layout, 3x faster than a float copy and .sum at 512 px;
    # integers add up in int64, so no count overflows
    acc = np.float32 if sub.dtype.kind == "f" else np.int64
    binned = np.einsum("ijkl->ik", sub.reshape(size, f, size, f), dtype=acc, casting="unsafe")
    return binned.astype(np.float32, copy=False)


def normalise(frames: np.ndarray) -> np.ndarray:
    """sqrt(I) (the measured modulus), each frame scaled to a mean of 1/4, so the input does
    not depend on exposure or detector gain."""
    x = np.sqrt(np.clip(frames, 0, None).astype(np.float32))
    mean = x.reshape(len(x), -1).mean(axis=1)
    return x / (4 * np.maximum(mean, 1e-6))[:, None, None]


def ptycho_preprocess(frames: list[np.ndarray], size: int) -> np.ndarray:
    stack = np.stack([to_input_size(f, size) for f in frames])
    return normalise(stack)[:, None]


@dataclass(frozen=True)
class ModelKind:
    name: str
    build: Callable[..., nn.Module]
    preprocess: Callable[[list[np.ndarray], int], np.ndarray]
    outputs: tuple[str, ...]


KINDS: dict[str, ModelKind] = {
    "ptychonn": ModelKind("ptychonn", PtychoNN, ptycho_preprocess, ("amplitude", "phase")),
    "braggnn": ModelKind("braggnn", BraggNN, braggnn_preprocess, ("center",)),
}


def kind(name: str) -> ModelKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown model kind {name!r}; known: {sorted(KINDS)}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
