"""The simulated beamline's area detector for the tests: ``beamline_ioc`` (the beamline alone,
serving CA on a port of its own) and ``read_back`` (a run's frames read through its resource
and datum documents with the registered handler)."""

import contextlib
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np

from tests.kit.env import random_prefix
from tests.kit.runs import of
from tests.kit.servers import System, small_config


@contextlib.contextmanager
def beamline_ioc(tmp: Path, port: int, request):
    """The simulated beamline alone (``edgeloop ioc --no-ml-ioc``) serving CA on ``port``."""
    cfg, path = small_config(tmp, random_prefix("a"))
    ioc = System(cfg, path, tmp / "logs", env={"EDGELOOP_BEAMLINE_CA_PORT": str(port)})
    try:
        ioc.start("ioc", "--no-ml-ioc", ready_pv="det:Pva1:Image")
        yield ioc
    finally:
        ioc.stop()
        if request.session.testsfailed:
            print(ioc.outputs())


def read_back(docs, key: str = "det_image") -> tuple[Path, np.ndarray]:
    """The file of the run's resource, and every event's frames read through its datum with
    the handler registered for the resource's spec (the ``databroker.handlers`` entry point)."""
    (resource,) = of(docs, "resource")
    handlers = {ep.name: ep for ep in entry_points(group="databroker.handlers")}
    path = Path(resource["root"], resource["resource_path"])
    handler = handlers[resource["spec"]].load()(str(path), **resource["resource_kwargs"])
    datums = {d["datum_id"]: d["datum_kwargs"] for d in of(docs, "datum")}
    try:
        frames = [
            handler(**datums[event["data"][key]]).compute(scheduler="synchronous")
            for event in of(docs, "event")
        ]
    finally:
        handler.close()
    return path, np.concatenate(frames)
