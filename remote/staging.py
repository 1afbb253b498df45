"""Getting scans to where retraining runs, and what a model records about its making.

Tasks receive references (paths) and checksums, never arrays.  ``remote.staging`` picks how
the scans get there:

- ``shared`` (default): the executor sees the same filesystem (local pool, a Parsl cluster
  with a shared filesystem); paths are passed as they are;
- ``globus``: no shared filesystem; each scan, and each model a task starts from, is copied
  by Globus Transfer from ``globus_source_collection`` to ``globus_dest_collection`` under
  ``globus_dest_dir``, the tasks get the destination paths, and the labels come back the
  same way.  Authentication: remote/globus_login.py (stored, refreshed tokens).

Also here: ``code_version`` and ``portable``/``relative`` (a scan's files as a folder
elsewhere will hold them).
"""

from __future__ import annotations

import json
import logging
import posixpath
import subprocess
from pathlib import Path, PurePosixPath

import edgeloop
from edgeloop import tiled_runs
from edgeloop.config import Config
from edgeloop.optional import require
from edgeloop.remote.errors import RetrainError
from edgeloop.remote.globus_login import GlobusLoginError, transfer_client
from edgeloop.scanfile import read_run_entry, resource_file

log = logging.getLogger(__name__)


STAGED = ".staged"  # under the data directory: the run entries as sent by Globus


class StagingError(RetrainError):
    """A transfer refused, failed or late, or staging not configured: ends the retraining
    in Error with this message."""


def code_version() -> str:
    """edgeloop's version, plus the git commit when running from a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{edgeloop.__version__}+g{commit}" if commit else edgeloop.__version__


def relative(path: str | Path, base: Path) -> str:
    """Where a file goes under the destination folder: its path under ``base`` (the data
    directory), so that two files of one name in two folders stay two; one elsewhere under
    ``external/`` with its whole path."""
    path = Path(path)
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(PurePosixPath("external", *path.parts[1:]))


def transfer_data(
    source_collection: str, dest_collection: str, items: list[tuple[str, str]], label: str
):
    """The Globus Transfer request: each (source path, destination path), checksummed."""
    globus_sdk = require("globus_sdk", "globus")

    tdata = globus_sdk.TransferData(
        source_endpoint=source_collection,
        destination_endpoint=dest_collection,
        label=label,
        sync_level="checksum",
        verify_checksum=True,
    )
    for source, dest in items:
        tdata.add_item(str(source), str(dest))
    return tdata


def globus_transfer(client, tdata, timeout_s: float, poll_s: float = 5.0) -> str:
    """Submit and wait; returns the task id, raises StagingError on failure or timeout (the
    task is cancelled then)."""
    try:
        task_id = client.submit_transfer(tdata)["task_id"]
    except Exception as exc:  # globus_sdk.GlobusAPIError, a network error
        raise StagingError(f"Globus transfer not accepted: {exc}") from exc
    log.info("Globus transfer %s submitted (%d files)", task_id, len(tdata["DATA"]))
    if not client.task_wait(task_id, timeout=int(timeout_s), polling_interval=int(poll_s)):
        client.cancel_task(task_id)
        raise StagingError(
            f"Globus transfer {task_id} did not finish in {timeout_s:.0f} s (cancelled)"
        )
    status = client.get_task(task_id)["status"]
    if status != "SUCCEEDED":
        raise StagingError(f"Globus transfer {task_id} ended {status}")
    return task_id


class SharedStaging:
    """The executor sees this filesystem: every path is passed as it is."""

    cache_labels = True

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def scans(self, scans: list[str]) -> list[str]:
        return list(scans)

    def models(self, paths: list[str]) -> list[str]:
        return list(paths)

    def labels_out(self, name: str) -> str:
        return str(self.cfg.registry_path / "work" / name)

    def labels_here(self, path: str) -> str:
        return path


class GlobusStaging:
    """No shared filesystem: what a retraining's tasks read goes to
    ``globus_dest_collection`` under ``globus_dest_dir`` by Globus Transfer (the scans, the
    models it starts from and is compared with), the labels the endpoint writes there come
    back under the registry's ``work/`` for the service's own held-out check.  The source
    collection is taken to show this host's paths as they are (a collection rooted at /)."""

    cache_labels = False  # the endpoint's filesystem is not ours: it labels everything

    def __init__(self, cfg: Config):
        r = cfg.remote
        if not (r.globus_source_collection and r.globus_dest_collection and r.globus_dest_dir):
            raise StagingError(
                "globus staging needs remote.globus_source_collection, "
                "globus_dest_collection and globus_dest_dir"
            )
        self.cfg, self._client = cfg, None
        self.dest = PurePosixPath(r.globus_dest_dir)

    @property
    def client(self):
        if self._client is None:
            try:
                self._client = transfer_client(self.cfg)
            except GlobusLoginError as exc:
                raise StagingError(str(exc)) from exc
        return self._client

    def _send(self, items: list[tuple[str, str]], label: str, back: bool = False) -> None:
        r = self.cfg.remote
        ends = (r.globus_source_collection, r.globus_dest_collection)
        tdata = transfer_data(*(ends[::-1] if back else ends), items, label)
        globus_transfer(self.client, tdata, r.transfer_timeout_s)

    def scans(self, scans: list[str]) -> list[str]:
        """Each scan (a run entry with the detector's files) at its path relative to the
        data directory under the destination folder."""
        base = self.cfg.data_path
        sent, files = portable(scans, base / STAGED, base)
        self._send([(f, self.dest / relative(f, base)) for f in files], "edgeloop scans")
        return [str(self.dest / relative(p, base)) for p in sent]

    def models(self, paths: list[str]) -> list[str]:
        """Registry model files under ``models/`` of the destination folder (one copy of a
        model that is both the start and the baseline)."""
        there = {p: str(self.dest / "models" / Path(p).name) for p in paths}
        if there:
            self._send(list(there.items()), "edgeloop models")
        return [there[p] for p in paths]

    def labels_out(self, name: str) -> str:
        return str(self.dest / "work" / name)

    def labels_here(self, path: str) -> str:
        """The labels file the endpoint wrote, brought back under the registry's work/."""
        here = self.cfg.registry_path / "work" / PurePosixPath(path).name
        here.parent.mkdir(parents=True, exist_ok=True)
        self._send([(path, str(here))], "edgeloop labels", back=True)
        return str(here)


class FlowStaging(GlobusStaging):
    """Globus staging whose transfers the flow makes: the items are collected for its
    TransferIn and TransferBack states instead of being sent by the service."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.transfer_in: list[dict] = []
        self.transfer_back: list[dict] = []

    def _send(self, items, label: str, back: bool = False) -> None:
        to = self.transfer_back if back else self.transfer_in
        to += [{"source_path": str(s), "destination_path": str(d)} for s, d in items]

    def labels_here(self, path: str) -> str:
        return str(self.cfg.registry_path / "work" / Path(path).name)  # TransferBack put it

    def bring_back(self, path: str) -> None:
        super().labels_here(path)  # records the item (and makes the folder)


def staging(cfg: Config, by_flow: bool = False):
    """The staging ``remote.staging`` names (``by_flow``: the executor's Globus Flow makes
    the transfers)."""
    if cfg.remote.staging == "shared":
        return SharedStaging(cfg)
    if cfg.remote.staging == "globus":
        return FlowStaging(cfg) if by_flow else GlobusStaging(cfg)
    raise StagingError(f"unknown staging {cfg.remote.staging!r}: shared or globus")


def portable(scans: list[str], folder: Path, base: Path) -> tuple[list[str], list[str]]:
    """What to send so that the scans read the same under one folder elsewhere, each file at
    its path relative to ``base``: (the scan paths to hand the task, every file to copy).  A
    run entry refers to the detector's files by where they are here, so a copy of it in
    ``folder`` refers to them relative to itself, and the files go with it.  A run stored
    in Tiled is sent as it is: the task reads it from the server."""
    sent, files = [], []
    for ref in scans:
        if tiled_runs.is_ref(ref):  # read through the Tiled server from there too
            sent.append(ref)
            continue
        scan = Path(ref)
        if scan.suffix != ".json":
            sent.append(str(scan))
            files.append(str(scan))
            continue
        entry = read_run_entry(scan)
        folder.mkdir(parents=True, exist_ok=True)
        copy = folder / scan.name
        for resource in entry["resources"]:
            file = resource_file(scan, resource)
            files.append(str(file))
            where = posixpath.relpath(
                relative(file, base), posixpath.dirname(relative(copy, base))
            )
            resource["root"], resource["resource_path"] = "", where
        copy.write_text(json.dumps(entry))
        sent.append(str(copy))
        files.append(str(copy))
    return sent, files
