"""Bluesky callback recording, for each run, where the detector wrote its frames."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from bluesky.callbacks.core import CallbackBase

from edgeloop.bluesky_plans.callbacks import _fsync
from edgeloop.config import PositionsConfig
from edgeloop.scanfile import POSITIONS, run_entry_name

log = logging.getLogger(__name__)

__all__ = ["RunIndex"]


@dataclass
class _Resource:
    entry: dict  # uid, spec, root, resource_path, resource_kwargs (what the entry records)
    per_point: int = 1  # frames per datum point
    points: int = 0  # max point_number + 1 (stream resources: max index stop)
    datums: int = 0
    events: int = 0  # events whose data refer to one of its datums


@dataclass
class _Run:
    start: dict
    resources: dict[str, _Resource] = field(default_factory=dict)  # by uid, in order
    datums: dict[str, str] = field(default_factory=dict)  # datum id -> resource uid


class RunIndex(CallbackBase):
    """Record each ptychography or HEDM run as a reference to the files its detector wrote:
    ``<data_dir>/run_<scan_id:05d>_<uid8>.json`` (read by :func:`edgeloop.scanfile.read_scan`
    and found by the retraining service).

    The callback keeps the start document, the run's ``resource`` (and ``stream_resource``)
    documents and, per resource, how many datums and events refer to it and how many frames
    (``(max point_number + 1) * frame_per_point``; of a stream resource the largest index
    stop).  At the stop document it writes the entry at once: to a temporary file, fsynced and
    renamed, so a ``run_*.json`` is never half-written.  The entry holds ``technique``,
    ``start``, ``stop`` and ``resources`` (``uid``, ``spec``, ``root``, ``resource_path``,
    ``resource_kwargs``, ``frames``, ``datums``, ``events``); never frames.  Datums of every
    stream count alike (a step scan's one per trigger, a fly scan's one per frame).

    Runs whose start document has no ``technique`` of ``'ptychography'`` or ``'hedm'`` are
    ignored; runs with no resource (a detector that puts its frames in the events:
    :class:`~edgeloop.bluesky_plans.callbacks.ScanWriter` records those) are skipped with a
    log line.  A write error is logged and kept in :attr:`errors`; it never stops the scan.

    Parameters
    ----------
    data_dir : str or os.PathLike
        Directory of the entries (created if missing; ``~`` is expanded).
    positions : PositionsConfig, optional
        The NDAttributes holding the stage positions in the detector's files (the
        configuration's ``[positions]``; default ``SampleX``, ``SampleY``, ``SampleRot``),
        recorded in each entry as ``position_attributes``.

    Attributes
    ----------
    last_path : pathlib.Path or None
        The entry of the latest recorded run.
    paths : list of pathlib.Path
        All entries written by this callback.
    errors : list of str
        Write errors.
    """

    def __init__(self, data_dir: str | os.PathLike, positions: PositionsConfig | None = None):
        super().__init__()
        self.data_dir = Path(data_dir).expanduser()
        self.positions = positions or PositionsConfig()
        self.last_path: Path | None = None
        self.paths: list[Path] = []
        self.errors: list[str] = []
        self._runs: dict[str, _Run] = {}
        self._descriptors: dict[str, str] = {}  # descriptor uid -> run start uid
        self._resources: dict[str, str] = {}  # resource uid -> run start uid

    # ------------------------------------------------------------------ documents

    def start(self, doc):
        if doc.get("technique") in POSITIONS:
            self._runs[doc["uid"]] = _Run(start=doc)
        else:
            log.debug("RunIndex: run %s has no known technique; not recorded", doc["uid"])
        return doc

    def descriptor(self, doc):
        if doc["run_start"] in self._runs:
            self._descriptors[doc["uid"]] = doc["run_start"]
        return doc

    def _run_of_resource(self, doc) -> _Run | None:
        start_uid = doc.get("run_start")
        if not start_uid and len(self._runs) == 1:  # resource documents of old made no link
            (start_uid,) = self._runs
        run = self._runs.get(start_uid)
        if run is not None:
            self._resources[doc["uid"]] = start_uid
        return run

    def resource(self, doc):
        run = self._run_of_resource(doc)
        if run is not None:
            kwargs = dict(doc.get("resource_kwargs") or {})
            entry = {
                "uid": doc["uid"],
                "spec": doc["spec"],
                "root": doc.get("root", ""),
                "resource_path": doc["resource_path"],
                "resource_kwargs": kwargs,
            }
            per_point = int(kwargs.get("frame_per_point", 1) or 1)
            run.resources[doc["uid"]] = _Resource(entry=entry, per_point=per_point)
        return doc

    def stream_resource(self, doc):
        run = self._run_of_resource(doc)
        if run is not None:
            parameters = dict(doc.get("parameters") or {})
            entry = {
                "uid": doc["uid"],
                "spec": doc["mimetype"],
                "root": "/",
                "resource_path": unquote(urlparse(doc["uri"]).path),
                "resource_kwargs": parameters,
                "data_key": doc.get("data_key"),
                "uri": doc["uri"],
            }
            per_point = int(parameters.get("multiplier", 1) or 1)
            run.resources[doc["uid"]] = _Resource(entry=entry, per_point=per_point)
        return doc

    def _resource(self, resource_uid: str) -> tuple[_Run, _Resource] | tuple[None, None]:
        run = self._runs.get(self._resources.get(resource_uid))
        if run is None:
            return None, None
        return run, run.resources[resource_uid]

    def datum(self, doc):  # datum_page documents come here one datum at a time
        run, resource = self._resource(doc["resource"])
        if resource is not None:
            resource.datums += 1
            point = (doc.get("datum_kwargs") or {}).get("point_number")
            # a datum without a point number: one point after those seen
            point = resource.points if point is None else int(point)
            resource.points = max(resource.points, point + 1)
            run.datums[doc["datum_id"]] = doc["resource"]
        return doc

    def stream_datum(self, doc):
        _, resource = self._resource(doc["stream_resource"])
        if resource is not None:
            resource.datums += 1
            resource.points = max(resource.points, int(doc["indices"]["stop"]))
        return doc

    def event(self, doc):  # event_page documents come here one event at a time
        run = self._runs.get(self._descriptors.get(doc["descriptor"]))
        if run is not None:
            for key, filled in (doc.get("filled") or {}).items():
                resource_uid = run.datums.get(doc["data"].get(key)) if not filled else None
                if resource_uid is not None:
                    run.resources[resource_uid].events += 1
        return doc

    def stop(self, doc):
        run = self._runs.pop(doc["run_start"], None)
        if run is None:
            return doc
        self._descriptors = {d: s for d, s in self._descriptors.items() if s != doc["run_start"]}
        self._resources = {r: s for r, s in self._resources.items() if s != doc["run_start"]}
        if not run.resources:
            log.info(
                "RunIndex: run %s (scan %s) refers to no detector files; not recorded",
                run.start["uid"],
                run.start.get("scan_id"),
            )
            return doc
        try:
            self._write(run, doc)
        except Exception as exc:  # never break the scan over this
            error = f"{run.start['uid']}: {type(exc).__name__}: {exc}"
            self.errors.append(error)
            log.error("RunIndex: cannot record run %s", error)
        return doc

    # ------------------------------------------------------------------ the entry

    def _write(self, run: _Run, stop: dict) -> None:
        resources = [
            dict(r.entry, frames=r.points * r.per_point, datums=r.datums, events=r.events)
            for r in run.resources.values()
        ]
        entry = {
            "technique": run.start["technique"],
            "start": run.start,
            "stop": stop,
            "resources": resources,
            # the NDAttributes the positions are in, as the beamline's attributes file named them
            "position_attributes": list(self.positions.of(run.start["technique"])),
        }
        text = json.dumps(entry, indent=1, default=repr)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / run_entry_name(run.start)
        tmp = path.with_name(f".{path.name}.tmp")  # no run_*.json until it is whole
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync(path.parent)  # the rename
        self.last_path = path
        self.paths.append(path)
        log.info(
            "RunIndex: recorded run %s in %s (%s frames in %d file(s), exit_status %s)",
            run.start["uid"],
            path,
            sum(r["frames"] for r in resources),
            len(resources),
            stop.get("exit_status"),
        )
