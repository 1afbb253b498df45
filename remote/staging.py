"""Getting scans to where retraining runs, and what a model records about its making.

Tasks receive references (paths) and checksums, never arrays.  ``remote.staging`` picks how
the scans get there:

- ``shared`` (default): the executor sees the same filesystem (local pool, a Parsl cluster
  with a shared filesystem); paths are passed as they are;
- ``globus``: each scan is copied by Globus Transfer from ``globus_source_collection`` to
  ``globus_dest_collection`` under ``globus_dest_dir`` and the task gets the destination
  paths.  Authentication: an access token for the Transfer API in ``GLOBUS_TRANSFER_TOKEN``
  (e.g. from ``globus login`` / a confidential client's client-credentials grant).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import subprocess
from pathlib import Path, PurePosixPath

import edgeloop
from edgeloop.config import Config
from edgeloop.optional import require
from edgeloop.scanfile import read_run_entry, resource_file

log = logging.getLogger(__name__)


STAGED = ".staged"  # under the data directory: the run entries as sent by Globus


class StagingError(RuntimeError):
    pass


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
    source_collection: str,
    dest_collection: str,
    paths: list[str],
    dest_dir: str,
    base: Path,
    label: str = "edgeloop scans",
):
    """The Globus Transfer request: every scan file to ``dest_dir``, at its path relative
    to ``base``, checksummed."""
    globus_sdk = require("globus_sdk", "globus")

    tdata = globus_sdk.TransferData(
        source_endpoint=source_collection,
        destination_endpoint=dest_collection,
        label=label,
        sync_level="checksum",
        verify_checksum=True,
    )
    for path in paths:
        tdata.add_item(str(path), str(PurePosixPath(dest_dir) / relative(path, base)))
    return tdata


def globus_transfer(client, tdata, timeout_s: float, poll_s: float = 5.0) -> str:
    """Submit and wait; returns the task id, raises StagingError on failure or timeout (the
    task is cancelled then)."""
    task_id = client.submit_transfer(tdata)["task_id"]
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


def stage(scans: list[str], cfg: Config, client=None) -> list[str]:
    """The scan paths as the executor will see them."""
    r = cfg.remote
    if r.staging == "shared":
        return list(scans)
    if r.staging != "globus":
        raise StagingError(f"unknown staging {r.staging!r}: shared or globus")
    if not (r.globus_source_collection and r.globus_dest_collection and r.globus_dest_dir):
        raise StagingError(
            "globus staging needs remote.globus_source_collection, "
            "globus_dest_collection and globus_dest_dir"
        )
    if client is None:
        globus_sdk = require("globus_sdk", "globus")
        token = os.environ.get("GLOBUS_TRANSFER_TOKEN")
        if not token:
            raise StagingError(
                "globus staging needs a Transfer access token in GLOBUS_TRANSFER_TOKEN"
            )
        client = globus_sdk.TransferClient(authorizer=globus_sdk.AccessTokenAuthorizer(token))
    base = cfg.data_path
    sent, files = portable(scans, base / STAGED, base)
    tdata = transfer_data(
        r.globus_source_collection, r.globus_dest_collection, files, r.globus_dest_dir, base
    )
    globus_transfer(client, tdata, r.transfer_timeout_s)
    return [str(PurePosixPath(r.globus_dest_dir) / relative(p, base)) for p in sent]


def portable(scans: list[str], folder: Path, base: Path) -> tuple[list[str], list[str]]:
    """What to send so that the scans read the same under one folder elsewhere, each file at
    its path relative to ``base``: (the scan paths to hand the task, every file to copy).  A
    run entry refers to the detector's files by where they are here, so a copy of it in
    ``folder`` refers to them relative to itself, and the files go with it."""
    sent, files = [], []
    for scan in map(Path, scans):
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
