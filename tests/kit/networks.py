"""Networks for the backend tests: ``network(kind, seed)``, a small PtychoNN or BraggNN
(``ARCH``) in eval mode whose batch norms hold running statistics that are not the identity,
as after training; ``SIZE``: each kind's input size."""

import torch

from edgeloop.models import kind as model_kind

ARCH = {"ptychonn": {"width": 4}, "braggnn": {"patch": 11, "width": 16}}
SIZE = {"ptychonn": 64, "braggnn": 11}


def network(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = model_kind(kind).build(**ARCH[kind]).eval()
    # batch norm with running statistics that are not the identity, as after training
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model
