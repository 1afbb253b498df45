"""Edge workers that share one detector stream through the source's data distributor.

pvDatabase, the server library of areaDetector's NDPluginPva and of pvapy, has a data
distributor plugin (pvDatabaseCPP documentation/dataDistributorPlugin.md; pvapy's streaming
framework uses it): clients whose pvRequest names the same group get disjoint updates, round
robin (``updates`` each, in the order they connected; a client that joins or leaves changes
the rotation).  Each worker is an ordinary :class:`EdgeServer` serving ``{prefix}edge:wK:*``
whose input monitor asks for the distributor with the group ``{prefix}edge``; the aggregate
(edge_pva/aggregate.py) serves the one set of ``{prefix}edge:*`` PVs.

The plugin is registered as ``distributor`` by pvDatabaseCPP (areaDetector) and also, in
pvapy, as ``pydistributor`` (its own copy; pvapy 5.6 servers answer to both).  The request
also names the NTNDArray's fields: a pvxs server (p4p, QSRV2, the simulated detector)
refuses a request that selects only the plugin's ``_`` entry ("pvRequest must select at least
one field"), and ignores names it does not have, so such a server sends every frame to every
worker; the aggregate then answers each uniqueId once and says so.

Like any monitor, a distributor client gets the PV's current value when it connects: a
worker that starts while frames flow answers that frame again (the aggregate counts the copy
in Repeats).  A worker's own MissedFrames counts the frames the distributor gave the others.
"""

from __future__ import annotations

import time

from p4p import Type, Value
from p4p.nt import NTScalar
from p4p.server.thread import SharedPV

from edgeloop.config import Config

DISTRIBUTOR_PLUGINS = ("distributor", "pydistributor")
# every field of an NTNDArray (a server ignores those its structure lacks)
NT_FIELDS = (
    "value",
    "codec",
    "compressedSize",
    "uncompressedSize",
    "dimension",
    "uniqueId",
    "dataTimeStamp",
    "attribute",
    "descriptor",
    "alarm",
    "timeStamp",
    "display",
)
# what the aggregate reads of each worker at every statistics interval
COUNTERS = ("FramesIn", "FramesOut", "Dropped", "BadFrames", "InFlight", "Repeats", "Restarts")
POLLED = (
    *COUNTERS,
    "Started",
    "LatencyMs",
    "DroppedRate",
    "ModelVersion",
    "Mode",
    "Consistency",
    "ScanConsistency",
)


def group_name(prefix: str) -> str:
    """The distributor group of the workers of the edge ``prefix``."""
    return f"{prefix}edge"


def worker_pv_prefix(prefix: str, k: int) -> str:
    return f"{prefix}edge:w{k}:"


def distributor_request(
    group: str,
    plugin: str = "distributor",
    trigger: str = "uniqueId",
    updates: int = 1,
    queue_size: int = 32,
) -> Value:
    """``field(<NTNDArray fields>,_[plugin=group:G;trigger:T;updates:N])record[queueSize=Q]``
    as a pvRequest Value (p4p's request parser has no ``_[...]`` syntax)."""
    if plugin not in DISTRIBUTOR_PLUGINS:
        raise ValueError(f"distributor plugin {plugin!r} is not one of {DISTRIBUTOR_PLUGINS}")
    options = f"group:{group};trigger:{trigger};updates:{updates}"
    fields = [(name, ("S", None, [])) for name in NT_FIELDS]
    plugin_options = ("_", ("S", None, [("_options", ("S", None, [(plugin, "s")]))]))
    request = Type(
        [
            ("field", ("S", None, [*fields, plugin_options])),
            ("record", ("S", None, [("_options", ("S", None, [("queueSize", "s")]))])),
        ]
    )
    return Value(
        request,
        {
            "field": {"_": {"_options": {plugin: options}}},
            "record": {"_options": {"queueSize": str(queue_size)}},
        },
    )


# what a worker serves beyond an edge's PVs (under {prefix}edge:wK:)
WORKER_PVS = {
    "Started": "when this worker started (NTScalar double, s since the epoch): the aggregate "
    "tells a restarted worker's counters by it",
    "RevertModel": "write a version this worker loaded: what served before serves again (the "
    "aggregate's, when not every worker loaded it; answered in order with LoadModel)",
}


def worker_server(cfg: Config, k: int, input_pv: str | None = None, plugin: str = "distributor"):
    """Worker ``k``: an EdgeServer serving ``{prefix}edge:wK:*`` (and ``Started``, the time
    this worker started: the aggregate tells a restarted worker's counters by it), its input
    shared with the other workers by the distributor."""
    from edgeloop.edge_pva.server import EdgeServer  # torch: only where inference runs

    started = SharedPV(nt=NTScalar("d"), initial=time.time())
    return EdgeServer(
        cfg,
        input_pv,
        pv_prefix=worker_pv_prefix(cfg.prefix, k),
        monitor_request=distributor_request(group_name(cfg.prefix), plugin),
        extra_pvs={"Started": started},
        worker=True,
    )


class WorkerCounts:
    """The counters of the workers, summed across their restarts.

    Each worker's values are taken from one poll; a poll caught between the worker's posts
    (its counts do not add up) is skipped.  A worker whose ``Started`` changed is a new
    process: the old one's last counts are kept, its frames in flight counted as dropped
    (lost with it)."""

    def __init__(self):
        self.current: dict[int, tuple[float, dict]] = {}
        self.base: dict[int, dict] = {}
        self.process_restarts = 0

    def update(self, k: int, values: dict) -> int | None:
        """Take worker ``k``'s polled values; the frames in flight its previous process
        lost when this is a new one, else None."""
        counts = {name: int(values[name]) for name in COUNTERS}
        settled = counts["FramesOut"] + counts["Dropped"] + counts["BadFrames"]
        if counts["FramesIn"] != settled + counts["InFlight"]:
            return None
        started = float(values["Started"])
        previous = self.current.get(k)
        self.current[k] = (started, counts)
        if previous is None or previous[0] == started:
            return None
        old = dict(previous[1])
        lost = old.pop("InFlight")
        old["Dropped"] += lost
        base = self.base.setdefault(k, dict.fromkeys(COUNTERS, 0))
        for name, value in old.items():
            base[name] += value
        self.process_restarts += 1
        return lost

    def totals(self, duplicates: int = 0) -> dict:
        """The sums; ``duplicates``: answers to a frame another worker answered already
        (counted as received and answered by each worker, once here, and in Repeats)."""
        total = dict.fromkeys(COUNTERS, 0)
        for counts in [c for _, c in self.current.values()] + list(self.base.values()):
            for name in COUNTERS:
                total[name] += counts.get(name, 0)
        total["FramesIn"] -= duplicates
        total["FramesOut"] -= duplicates
        total["Repeats"] += duplicates
        total["Restarts"] += self.process_restarts
        return total
