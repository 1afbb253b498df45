"""A served network as an ONNX graph: what the onnxruntime backend runs and what TensorRT
builds its engines from.

The graph takes ``x`` (batch, 1, n, n) float32, the batch dimension dynamic, and gives
``y0``, ``y1``, ... float32 in the order the network returns them.  An fp16 graph keeps fp32
inputs and outputs and computes in fp16 inside (casts at both ends): TensorRT's strongly
typed networks take their precision from the graph.  The export is deterministic: the same
weights give the same bytes, so their sha256 can key a cache.
"""

from __future__ import annotations

import copy
import io
import warnings

import torch
from torch import nn

from edgeloop.optional import require

INPUT = "x"
OPSET = 17


def output_names(n: int) -> list[str]:
    return [f"y{i}" for i in range(n)]


class _Half(nn.Module):
    """fp32 in, fp16 inside, fp32 out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).half().eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(o.float() for o in self.model(x.half()))


def export_onnx(model: nn.Module, input_size: int, precision: str = "fp32") -> bytes:
    """The network (in eval mode, batch norm folded) as ONNX bytes, in ``precision``
    ("fp32" or "fp16")."""
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")
    require("onnx", "onnx")  # torch.onnx.export needs it
    model = model.eval()
    net = _Half(model) if precision == "fp16" else model
    example = torch.zeros(2, 1, input_size, input_size)
    with torch.no_grad():
        n_out = len(net(example))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript exporter is called "legacy" but is the one that takes these
        # networks as they are (fixed graph, dynamic batch)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (example,),
            buf,
            input_names=[INPUT],
            output_names=output_names(n_out),
            dynamic_axes={INPUT: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return buf.getvalue()
