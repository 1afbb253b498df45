"""``edgeloop ipython-profile`` (app layer): an IPython profile whose startup file opens a
Bluesky session on the beamline: the devices, the plans, ``RE`` with the live table, the
scan progress bar, the edge's live plot, the ScanWriter and the RetrainTrigger."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from edgeloop.config import PositionsConfig

PROFILE = "edgeloop"

STARTUP = '''\
"""edgeloop's Bluesky session (written by `edgeloop ipython-profile`)."""
{pin}from functools import partial

from bluesky import RunEngine
from bluesky.callbacks.best_effort import BestEffortCallback
from ophyd.signal import EpicsSignalBase

# as beamline profiles do: ophyd's 1 s to connect a lazy signal is short on a busy host
EpicsSignalBase.set_defaults(connection_timeout=5.0)

from edgeloop.config import PositionsConfig
from edgeloop.bluesky_plans import (
    EdgeLivePlot,
    RetrainTrigger,
    RunIndex,
    ScanProgress,
    hedm_fly_scan,
    hedm_rotation_scan,
    make_devices,
    ptycho_fly_scan,
    ptycho_scan,
)

PREFIX = "{prefix}"
POSITIONS = PositionsConfig({positions})  # the NDAttributes holding the stage positions
# the fly scans read the positions the detector stamped on each frame under these names
ptycho_fly_scan = partial(ptycho_fly_scan, positions=POSITIONS)
hedm_fly_scan = partial(hedm_fly_scan, positions=POSITIONS)
det, stage = make_devices(PREFIX, "{data_dir}/detector")  # the IOC writes frames there
RE = RunEngine({{}})
bec = BestEffortCallback()  # the live table
RE.subscribe(bec)
RE.subscribe(ScanProgress())  # a progress bar over the scan's points
live = EdgeLivePlot(PREFIX)  # the stitched phase map (ptycho) / peaks per frame (HEDM)
RE.subscribe(live)
RE.subscribe(RunIndex("{data_dir}", POSITIONS))  # each run's detector files, for retraining
RE.subscribe(RetrainTrigger(PREFIX, every_n_runs=1))  # retrain after each good run
print(f"edgeloop session on {{PREFIX}}: "
      "RE(ptycho_fly_scan(det, stage, num=963, step=0.05, rate_hz=200)), "
      "RE(ptycho_scan(det, stage, num=963, step=0.05)), "
      "RE(hedm_fly_scan(det, stage, 0, 30, 120, rate_hz=60))")
'''

PIN = """from edgeloop.config import pin_loopback

pin_loopback()  # the simulated beamline on this host: EPICS traffic stays on loopback
"""


def ipython_dir() -> Path:
    return Path(os.environ.get("IPYTHONDIR", "~/.ipython")).expanduser()


def write_profile(
    prefix: str,
    data_dir: str,
    simulated: bool = False,
    directory: Path | None = None,
    positions: PositionsConfig | None = None,
) -> Path:
    """Write ``profile_edgeloop/startup/00-edgeloop.py`` under ``directory`` (the IPython
    directory by default) and return its path; ``positions``: the configuration's."""
    startup = (directory or ipython_dir()) / f"profile_{PROFILE}" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    path = startup / "00-edgeloop.py"
    names = dataclasses.asdict(positions or PositionsConfig())
    text = STARTUP.format(
        pin=PIN if simulated else "",
        prefix=prefix,
        data_dir=data_dir,
        positions=", ".join(f"{k}={v!r}" for k, v in names.items()),
    )
    path.write_text(text)
    return path
