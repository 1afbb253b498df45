"""Loops in one process for the tests: ``hedm_scan`` (a rotation scan written through the
RunEngine and ScanWriter with ophyd.sim hardware) and ``Loop`` (the ML IOC, an edge server and
the retraining service on a prefix of their own)."""

import time
from pathlib import Path

import numpy as np
from p4p.client.thread import Context

from edgeloop.config import Config
from edgeloop.signing import create_key
from tests.kit.env import random_prefix
from tests.kit.runs import run_engine


def hedm_scan(data_dir: Path, frames: int = 12, start: float = 0.0, blank: bool = False):
    """One HEDM rotation scan through the RunEngine and ScanWriter (ophyd.sim hardware)."""
    from ophyd import Component as Cpt
    from ophyd import Device
    from ophyd.sim import SynAxis, SynSignal

    from edgeloop.bluesky_plans import ScanWriter, hedm_rotation_scan
    from edgeloop.config import HedmConfig
    from edgeloop.ioc.hedm_sim import HedmSimulator

    sim = HedmSimulator(HedmConfig(frame_size=256))
    rot = SynAxis(name="rot")

    def render():
        if blank:
            return np.full((256, 256), 20, np.uint16)
        return sim.frame(float(rot.position))[0]

    class Cam(Device):
        image = Cpt(SynSignal, func=render, kind="hinted")

        def trigger(self):
            return self.image.trigger()

    writer = ScanWriter(data_dir)
    with run_engine() as RE:
        RE.subscribe(writer)
        RE(hedm_rotation_scan(Cam(name="cam"), rot, start, start + 3.0, frames))
    return writer.last_path


class Loop:
    """ML IOC + edge server + retraining service (in process) on a prefix of their own."""

    def __init__(self, tmp: Path, **remote):
        from edgeloop.edge_pva.server import EdgeServer
        from edgeloop.ioc import softioc

        self.cfg = Config(
            prefix=random_prefix("r"),
            mode="hedm",
            data_dir=str(tmp / "data"),
            registry_dir=str(tmp / "models"),
        )
        self.cfg.security.signing_key_file = str(tmp / "signing.key")  # never ~/.edgeloop
        create_key(tmp / "signing.key")
        self.cfg.tiled.enabled = False  # the scans are files in data_dir
        self.cfg.hedm.frame_size = 256
        self.cfg.train_hedm.epochs = 4
        for key, value in remote.items():
            setattr(self.cfg.remote, key, value)
        self.p = self.cfg.prefix
        self.ioc = softioc.start(self.p)
        self.edge = EdgeServer(self.cfg, input_pv=f"{self.p}none:Image").start()
        self.ctx = Context("pva", nt=False)
        self.service = None

    def start_service(self, executor: str = "local"):
        from edgeloop.remote.service import RetrainService

        self.cfg.executor = executor
        self.service = RetrainService(self.cfg).start()
        return self.service

    def value(self, name):
        return self.ctx.get(f"{self.p}{name}", timeout=5)["value"]

    def state(self):
        v = self.ctx.get(f"{self.p}ml:Status", timeout=5)["value"]
        return v["choices"][v["index"]]

    def wait_state(self, states, timeout):
        deadline = time.monotonic() + timeout
        while (s := self.state()) not in states:
            assert time.monotonic() < deadline, (s, self.value("ml:Message"))
            time.sleep(0.1)
        return s

    def retrain(self, timeout=300):
        """Trigger through the PV, as an operator, and wait for the outcome."""
        done = self.service.runs_finished
        self.ctx.put(f"{self.p}ml:Retrain", {"value.index": 1}, timeout=5)
        deadline = time.monotonic() + timeout
        while self.service.runs_finished == done:
            assert time.monotonic() < deadline, self.value("ml:Message")
            time.sleep(0.1)
        return self.state()

    def close(self):
        if self.service is not None:
            self.service.stop()
        self.ctx.close()
        self.edge.stop()
        self.ioc.stdin.close()
        self.ioc.wait(10)


def hedm_pipeline_config(tmp: Path) -> Config:
    """A small HEDM retraining with no EPICS (the pipeline's tests): one 12-frame scan as
    files in data_dir, a signing key, 4 epochs."""
    cfg = Config(mode="hedm", data_dir=str(tmp / "data"), registry_dir=str(tmp / "m"))
    cfg.tiled.enabled = False  # the scans are files in data_dir
    cfg.security.signing_key_file = str(tmp / "signing.key")
    create_key(tmp / "signing.key")
    cfg.hedm.frame_size = 256
    cfg.train_hedm.epochs = 4
    hedm_scan(cfg.data_path, 12)
    return cfg
