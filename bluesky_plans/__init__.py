"""Bluesky side of edgeloop: ophyd devices, the ptychography and HEDM scan plans, and the
HDF5 writer.  A part: it imports only the core (``edgeloop``'s own modules), never another
part.

The devices (and so ophyd and its Channel Access layer) are imported lazily, on first use of
one of their names, so ``read_scan`` and the plans can be used without EPICS.  Call
:func:`edgeloop.config.pin_loopback` before touching the devices when talking to the
simulated beamline (its Channel Access server listens on a non-standard port).
"""

from edgeloop.bluesky_plans.callbacks import SCAN_DATASETS, RetrainTrigger, ScanWriter, read_scan
from edgeloop.bluesky_plans.fly import TrajectoryFlyer, hedm_fly_scan, ptycho_fly_scan
from edgeloop.bluesky_plans.live import EdgeLivePlot, ScanProgress
from edgeloop.bluesky_plans.plans import hedm_rotation_scan, ptycho_scan, spiral_positions
from edgeloop.bluesky_plans.run_index import RunIndex
from edgeloop.bluesky_plans.tiled_store import FileAttributes, tiled_writer

_DEVICE_NAMES = (
    "AreaDetector",
    "HDF5PluginWithFileStore",
    "ProfileMove",
    "PtychoDetector",
    "PvaImageSignal",
    "SampleStage",
    "SimDetector",
    "make_ad_devices",
    "make_devices",
)

__all__ = [
    "SCAN_DATASETS",
    "AreaDetector",
    "HDF5PluginWithFileStore",
    "EdgeLivePlot",
    "FileAttributes",
    "ScanProgress",
    "ProfileMove",
    "PtychoDetector",
    "PvaImageSignal",
    "RetrainTrigger",
    "RunIndex",
    "SampleStage",
    "SimDetector",
    "ScanWriter",
    "TrajectoryFlyer",
    "hedm_fly_scan",
    "hedm_rotation_scan",
    "ptycho_fly_scan",
    "make_ad_devices",
    "make_devices",
    "ptycho_scan",
    "read_scan",
    "spiral_positions",
    "tiled_writer",
]


def __getattr__(name):
    if name in _DEVICE_NAMES:
        from edgeloop.bluesky_plans import devices

        return getattr(devices, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
