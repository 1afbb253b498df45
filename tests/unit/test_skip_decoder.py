"""PtychoNN's U-Net decoder option (``model.decoder = "skip"``, issue 25 item 2): the same
outputs and ranges, a size near the plain one, a file round trip under the architecture
checks, an ONNX export, and training that learns fine detail the plain decoder blurs."""

import numpy as np
import pytest
import torch

from edgeloop.config import Config, SecurityConfig
from edgeloop.models import PtychoNN, count_parameters
from edgeloop.onnx_export import export_onnx
from edgeloop.registry import ModelFileError, check_arch, model_from_bytes, model_to_bytes


def test_the_skip_decoder_keeps_the_outputs_and_about_the_size():
    plain, skip = PtychoNN(8).eval(), PtychoNN(8, skip=1).eval()
    with torch.no_grad():
        amp, phase = skip(torch.rand(3, 1, 64, 64))
    assert amp.shape == phase.shape == (3, 1, 64, 64)
    assert amp.min() >= 0 and amp.max() <= 1 and phase.abs().max() <= np.pi
    assert count_parameters(skip) < 1.2 * count_parameters(plain)
    cfg = Config()
    cfg.model.decoder = "skip"
    assert cfg.arch("ptychonn") == {"width": cfg.model.width, "skip": 1}


def test_a_skip_model_file_loads_and_a_bad_flag_is_refused():
    arch = {"width": 4, "skip": 1}
    net = PtychoNN(**arch).eval()
    loaded, info = model_from_bytes(model_to_bytes("ptychonn", arch, net))
    assert info["arch"] == arch and loaded.skip
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        for a, b in zip(net(x), loaded(x), strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ModelFileError, match="not 0 or 1"):
        check_arch("ptychonn", {"width": 4, "skip": 2}, SecurityConfig())
    with pytest.raises(ModelFileError, match="unknown braggnn architecture key 'skip'"):
        check_arch("braggnn", {"patch": 11, "skip": 1}, SecurityConfig())
    assert export_onnx(net, 32)[:2]  # exports (the records and the ONNX backends)


def test_skip_connections_learn_detail_the_bottleneck_loses():
    """A sharp pattern behind the input, to be returned as phase: with the same steps the
    skip decoder gets far closer (the plain one must pass it through an N/8 bottleneck)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(32, 1, 32, 32, generator=g) > 0.5).float()  # pixel-scale detail
    target = (x - 0.5) * 2.0  # phase in (-1, 1) rad, the same pattern

    def fit(net) -> float:
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(60):
            opt.zero_grad()
            loss = ((net(x)[1] - target) ** 2).mean()
            loss.backward()
            opt.step()
        return loss.item()

    plain, skip = fit(PtychoNN(4)), fit(PtychoNN(4, skip=1))
    print(f"60 steps on pixel-scale detail: MSE plain {plain:.4f}, skip {skip:.4f}")
    assert skip < 0.5 * plain
