"""``edgeloop ipython-profile`` (app layer): an IPython profile whose startup file opens a
Bluesky session on the beamline: the devices, the plans, ``RE`` with the live table, the
scan progress bar, the edge's live plot, the ScanWriter and the RetrainTrigger."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from edgeloop.config import PositionsConfig, TiledConfig

PROFILE = "edgeloop"

STARTUP = '''\
"""edgeloop's Bluesky session (written by `edgeloop ipython-profile`)."""
{pin}from functools import partial
from pathlib import Path

from bluesky import RunEngine
from bluesky.callbacks.best_effort import BestEffortCallback
from ophyd.signal import EpicsSignalBase

# as beamline profiles do: ophyd's 1 s to connect a lazy signal is short on a busy host
EpicsSignalBase.set_defaults(connection_timeout=5.0)

from edgeloop.config import PositionsConfig, TiledConfig
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
    tiled_writer,
)
from edgeloop.tiled_runs import connect, server_uri

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
{store}RE.subscribe(RetrainTrigger(PREFIX, every_n_runs=1))  # retrain after each good run
print(f"edgeloop session on {{PREFIX}}: "
      "RE(ptycho_fly_scan(det, stage, num=963, step=0.05, rate_hz=200)), "
      "RE(ptycho_scan(det, stage, num=963, step=0.05)), "
      "RE(hedm_fly_scan(det, stage, 0, 30, 120, rate_hz=60))")
'''

# runs go to Tiled where the configuration enables it; else (or while no server answers)
# each run's detector files are recorded as a run entry in the data directory
TILED_STORE = """TILED = TiledConfig({tiled})
try:
    tiled = connect(TILED, Path("{data_dir}"))  # the catalog of runs
    RE.subscribe(tiled_writer(tiled, POSITIONS))  # each run, its frames and their series
except Exception as exc:
    print(f"Tiled at {{server_uri(TILED)}} does not answer ({{exc}}): start it with "
          "`edgeloop tiled` (same --config); runs are recorded as files meanwhile")
    RE.subscribe(RunIndex("{data_dir}", POSITIONS))
"""
FILE_STORE = """RE.subscribe(RunIndex("{data_dir}", POSITIONS))  # each run's detector files
"""

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
    tiled: TiledConfig | None = None,
) -> Path:
    """Write ``profile_edgeloop/startup/00-edgeloop.py`` under ``directory`` (the IPython
    directory by default) and return its path; ``positions`` and ``tiled``: the
    configuration's (runs recorded in Tiled, else as run entries in ``data_dir``)."""
    startup = (directory or ipython_dir()) / f"profile_{PROFILE}" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    path = startup / "00-edgeloop.py"
    names = dataclasses.asdict(positions or PositionsConfig())
    tiled = tiled or TiledConfig(enabled=False)
    store = TILED_STORE if tiled.enabled else FILE_STORE
    settings = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(tiled).items())
    text = STARTUP.format(
        store=store.format(tiled=settings, data_dir=data_dir),
        pin=PIN if simulated else "",
        prefix=prefix,
        data_dir=data_dir,
        positions=", ".join(f"{k}={v!r}" for k, v in names.items()),
    )
    path.write_text(text)
    return path
