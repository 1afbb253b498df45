"""Recording runs in Tiled: :func:`tiled_writer` (bluesky-tiled-plugins' ``TiledWriter``
behind :class:`FileAttributes`).

TiledWriter registers what the documents point to: of an areaDetector run, the frames
(``/entry/data/data`` of each HDF5 file).  The uniqueIds, time stamps and stage positions
of those frames are NDAttribute series in the same files, which no document names, so a
Tiled user (and the retraining, :mod:`edgeloop.tiled_runs`) could not read them through
Tiled.  :class:`FileAttributes` adds them as data keys of their own, one per series, for
each image of an ``AD_HDF5`` resource or an HDF5 stream resource (ophyd v1 and ophyd-async
detectors, the simulated and the real areaDetector alike): ``<image>_unique_id``,
``<image>_timestamp`` and ``<image>_x``/``_y`` (ptychography) or ``<image>_rotation``
(HEDM), each pointing at the series in the file the frames are in.  Tiled then serves
them like the frames, from the file (SWMR while the detector writes).
"""

from __future__ import annotations

import copy
import logging
import uuid

import event_model

from edgeloop.adfile import ATTRIBUTES, DATA, TIMESTAMP, UNIQUE_ID
from edgeloop.config import PositionsConfig
from edgeloop.scanfile import AD_HDF5_SPECS, POSITIONS
from edgeloop.tiled_runs import POSITION_ROLES, companion, run_ref

log = logging.getLogger(__name__)

__all__ = ["FileAttributes", "tiled_writer"]

# role -> (the data key's dtype, its numpy dtype as areaDetector writes the series)
ROLE_TYPES = {"unique_id": ("integer", "<i4"), "timestamp": ("number", "<f8")}
POSITION_TYPE = ("number", "<f8")  # EPICS_PV attributes of a motor (DBR_DOUBLE)


class FileAttributes:
    """A document filter in front of ``downstream`` (a TiledWriter): each run of a known
    technique gets, beside each image the detector filed, data keys for the image's
    NDAttribute series (see the module).  Documents of other runs pass unchanged.

    Parameters
    ----------
    downstream : callable
        Receives ``(name, doc)``: the documents, with the added ones.
    positions : PositionsConfig, optional
        The NDAttributes holding the positions (the configuration's ``[positions]``).
    ref : callable, optional
        A run's reference from its uid (:func:`edgeloop.tiled_runs.run_ref`).

    Attributes
    ----------
    last_path : str or None
        The reference of the latest run of a known technique that stopped.
    """

    def __init__(self, downstream, positions: PositionsConfig | None = None, ref=None):
        self.downstream = downstream
        self.positions = positions or PositionsConfig()
        self.ref = ref or (lambda uid: uid)
        self.last_path: str | None = None
        self._series: dict[str, str] = {}  # role -> NDAttribute path, of the open run
        self._images: set[str] = set()  # image data keys of the open run's descriptors
        self._resources: dict[str, dict[str, str]] = {}  # resource uid -> role -> companion
        self._datums: dict[str, dict[str, str]] = {}  # datum id -> role -> companion datum

    def __call__(self, name: str, doc: dict) -> None:
        if name == "datum_page":
            for datum in event_model.unpack_datum_page(doc):
                self("datum", datum)
            return
        if name == "event_page":
            for event in event_model.unpack_event_page(doc):
                self("event", event)
            return
        handler = getattr(self, f"_{name}", None)
        extra = None
        if handler and (self._series or name == "start"):
            # the RunEngine hands every callback the same documents: change copies only
            doc = copy.deepcopy(doc) if name in ("descriptor", "event", "resource") else doc
            extra = handler(doc)
        self.downstream(name, doc)
        for item in extra or ():
            self.downstream(*item)

    def _start(self, doc):
        technique = doc.get("technique")
        self._series, self._images, self._resources, self._datums = {}, set(), {}, {}
        if technique in POSITIONS:
            self._series = {"unique_id": UNIQUE_ID, "timestamp": TIMESTAMP}
            names = self.positions.of(technique)
            self._series.update(
                (role, f"{ATTRIBUTES}/{n}") for role, n in zip(POSITION_ROLES[technique], names)
            )

    def _descriptor(self, doc):
        keys = doc["data_keys"]
        for key, info in list(keys.items()):
            if info.get("external") and len(info.get("shape") or ()) >= 2:
                self._images.add(key)
                if len(info["shape"]) == 3 and info["shape"][0] == 1:
                    # ophyd's (NumImages, ny, nx) for one frame a point: as (ny, nx), the
                    # array Tiled serves has the file's rank, and a file that holds more
                    # frames than the run (the detector ran on after an abort) is read to
                    # the run's frames; with the extra axis Tiled refuses the reshape
                    info["shape"] = list(info["shape"][1:])
                for role, path in self._series.items():
                    dtype, numpy = ROLE_TYPES.get(role, POSITION_TYPE)
                    keys[companion(key, role)] = {
                        "source": f"{info.get('source', '')} {path}".strip(),
                        "dtype": dtype,
                        "dtype_numpy": numpy,
                        "shape": list(info["shape"][:-2]),
                        "external": info["external"],
                    }

    def _resource(self, doc):
        if doc.get("spec") not in AD_HDF5_SPECS:
            return None
        kwargs = doc.setdefault("resource_kwargs", {})
        if kwargs.get("dataset", DATA) != DATA:
            return None
        if kwargs.get("frame_per_point") == 1:  # with it, Tiled adds the axis taken off above
            del kwargs["frame_per_point"]
        return self._companions("resource", doc, lambda role, path: {
            "resource_kwargs": dict(kwargs, dataset=path)
        })  # fmt: skip

    def _datum(self, doc):
        made = self._resources.get(doc["resource"])
        if made is None:
            return None
        extra, ids = [], {}
        for role, resource in made.items():
            datum_id = f"{resource}/{doc['datum_id'].rsplit('/', 1)[-1]}"
            ids[role] = datum_id
            extra.append(("datum", dict(doc, resource=resource, datum_id=datum_id)))
        self._datums[doc["datum_id"]] = ids
        return extra

    def _event(self, doc):
        data, filled = doc["data"], doc.setdefault("filled", {})
        for key in self._images & set(data):
            ids = self._datums.get(data[key]) if not filled.get(key) else None
            for role, datum_id in (ids or {}).items():
                data[companion(key, role)] = datum_id
                doc["timestamps"][companion(key, role)] = doc["timestamps"].get(key, doc["time"])
                filled[companion(key, role)] = False

    def _stream_resource(self, doc):
        parameters = doc.get("parameters") or {}
        if doc.get("mimetype") != "application/x-hdf5" or doc.get("data_key") not in self._images:
            return None
        if parameters.get("dataset", DATA) != DATA:
            return None
        series = dict(parameters)
        if "chunk_shape" in series:  # (frames per chunk, ny, nx) of the frames
            series["chunk_shape"] = list(series["chunk_shape"])[:-2]
        return self._companions("stream_resource", doc, lambda role, path: {
            "data_key": companion(doc["data_key"], role),
            "parameters": dict(series, dataset=path),
        })  # fmt: skip

    def _companions(self, name: str, doc: dict, change) -> list:
        """A copy of the resource ``doc`` for each series, ``change(role, path)`` applied."""
        made, extra = {}, []
        for role, path in self._series.items():
            made[role] = uid = str(uuid.uuid4())
            extra.append((name, dict(doc, uid=uid, **change(role, path))))
        self._resources[doc["uid"]] = made
        return extra

    def _stream_datum(self, doc):
        made = self._resources.get(doc["stream_resource"])
        return [
            ("stream_datum", dict(doc, uid=f"{resource}/{doc['uid']}", stream_resource=resource))
            for resource in (made or {}).values()
        ]

    def _stop(self, doc):
        self.last_path = self.ref(doc["run_start"])
        self._series, self._images, self._resources, self._datums = {}, set(), {}, {}


def tiled_writer(client, positions: PositionsConfig | None = None) -> FileAttributes:
    """The callback to subscribe to a RunEngine: TiledWriter on ``client`` (a Tiled
    container the API key may write), behind :class:`FileAttributes`."""
    from bluesky_tiled_plugins import TiledWriter

    return FileAttributes(TiledWriter(client), positions, ref=lambda uid: run_ref(client, uid))
