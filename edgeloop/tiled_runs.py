"""Runs stored in Tiled: finding them (:class:`TiledRuns`) and reading their frames
(:func:`read_run`), as the retraining and its policy do.

A run is recorded by bluesky-tiled-plugins' TiledWriter behind
:class:`edgeloop.bluesky_plans.tiled_store.FileAttributes`: its ``primary`` stream holds an
image (the frames in the detector's HDF5 files) and, beside it, the frames' uniqueIds, time
stamps and positions (``<image>_unique_id``, ...: :func:`companion`), all read through the
Tiled server from those files.  A run is referred to by its node's URL
(``<server>/api/v1/metadata/<uid>``), which :func:`edgeloop.scanfile.read_scan` also
takes, so the retraining's tasks read a run wherever they run, given the server's API key
(``TILED_API_KEY`` in their environment, as Tiled's client reads it).

Also here: where the embedded server lives and its key (:func:`server_uri`,
:func:`api_key`, :func:`use_key`), and :func:`connect`, whose keys :func:`read_run` uses.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeloop.adfile import EPICS_EPOCH
from edgeloop.config import SCAN_POSITIONS as POSITIONS

log = logging.getLogger(__name__)

# technique -> the roles of its position series, in scanfile.POSITIONS's order
POSITION_ROLES = {"ptychography": ("x", "y"), "hedm": ("rotation",)}
STREAM = "primary"
METADATA = "/api/v1/metadata/"
KEY_FILE = "api_key"  # of the embedded server, under its directory (mode 0600)


def companion(image: str, role: str) -> str:
    """The data key of an image's series ``role`` (unique_id, timestamp, x, y, rotation)."""
    return f"{image}_{role}"


def is_ref(path) -> bool:
    """Whether ``path`` names a Tiled run (a URL) rather than a file."""
    return str(path).startswith(("http://", "https://"))


def server_dir(data_path: Path) -> Path:
    """The embedded server's directory (catalog, logs, key): ``<data_dir>/tiled``."""
    return Path(data_path) / "tiled"


def server_uri(tiled_cfg) -> str:
    """The server's API root: the configured ``uri``, or the embedded server's."""
    return (tiled_cfg.uri or f"http://127.0.0.1:{tiled_cfg.port}/api/v1").rstrip("/")


def api_key(tiled_cfg, data_path: Path, create: bool = False) -> str | None:
    """The key: the configured one, else ``$TILED_API_KEY``, else (the embedded server) the
    one kept in its directory, made there on first use when ``create``."""
    if tiled_cfg.api_key:
        return tiled_cfg.api_key
    if os.environ.get("TILED_API_KEY"):
        return os.environ["TILED_API_KEY"]
    if tiled_cfg.uri:
        return None  # a facility server that takes no key (or a login)
    path = server_dir(data_path) / KEY_FILE
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16))
        try:
            os.link(tmp, path)  # whole, and only the first of two starting at once wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip() if path.exists() else None


def use_key(tiled_cfg, data_path: Path, create: bool = False) -> str | None:
    """The key (:func:`api_key`), put in this process's environment as ``TILED_API_KEY``,
    where Tiled's client reads it: for a process whose workers read runs (the service)."""
    key = api_key(tiled_cfg, data_path, create)
    if key:
        os.environ["TILED_API_KEY"] = key
    return key


# the key each server was connected with in this process, by its API root: a run's
# reference is read with its own server's key (else $TILED_API_KEY, as Tiled's client reads)
_KEYS: dict[str, str] = {}


def connect(tiled_cfg, data_path: Path):
    """A client of the configured (or embedded) server's root container; its key is
    remembered for :func:`read_run` of the references of that server's runs."""
    from tiled.client import from_uri

    uri, key = server_uri(tiled_cfg), api_key(tiled_cfg, data_path)
    if key:
        _KEYS[uri] = key
    return from_uri(uri, api_key=key)


def run_ref(client, uid: str) -> str:
    """The reference of run ``uid`` of the catalog ``client``: its node's URL."""
    return f"{client.uri.rstrip('/')}/{uid}"


def _node(ref: str):
    from tiled.client import from_uri

    key = next((k for uri, k in _KEYS.items() if ref.startswith(f"{uri}/")), None)
    return from_uri(ref, api_key=key)  # None: $TILED_API_KEY, as Tiled's client reads it


def _image_key(stream) -> str:
    keys = set(stream)
    images = [k for k in keys if companion(k, "unique_id") in keys]
    if len(images) != 1:
        raise ValueError(
            f"stream {STREAM!r} has {len(images)} images with their file's series "
            f"(keys: {sorted(keys)}); was the run recorded through FileAttributes?"
        )
    return images[0]


def _rows(stream, key: str, n: int, image: bool = False) -> np.ndarray:
    """The first ``n`` points of a key, as frames (n * frames per point, ny, nx) or as a
    series (n * frames per point,)."""
    a = stream[key]
    data = np.asarray(a[:n]) if n else np.zeros((0, *a.shape[1:]), a.dtype)
    return data.reshape(-1, *a.shape[-2:]) if image else data.reshape(-1)


def read_run(ref: str, node=None) -> dict:
    """A run's frames, uniqueIds, time stamps (unix seconds) and positions, read through
    Tiled, as :func:`edgeloop.scanfile.read_scan` returns a scan.  Of a run still written,
    the rows every series holds.

    Raises
    ------
    ValueError
        If the node is not a run of a known technique recorded with its file's series.
    """
    node = node if node is not None else _node(ref)
    start, stop = node.metadata["start"], node.metadata.get("stop")
    technique = start.get("technique")
    if technique not in POSITIONS:
        raise ValueError(f"{ref}: not a run of a known technique ({technique!r})")
    if STREAM not in node:
        raise ValueError(f"{ref}: no {STREAM!r} stream")
    stream = node[STREAM]
    image = _image_key(stream)
    roles = ("unique_id", "timestamp", *POSITION_ROLES[technique])
    n = min(stream[k].shape[0] for k in (image, *(companion(image, r) for r in roles)))
    series = {r: _rows(stream, companion(image, r), n).astype(np.float64) for r in roles}
    frames = _rows(stream, image, n, image=True)
    rows = min(len(frames), *(len(v) for v in series.values()))
    positions = [series[r][:rows] for r in POSITION_ROLES[technique]]
    key = POSITIONS[technique][0]
    return {
        "frames": frames[:rows],
        "unique_id": series["unique_id"][:rows].astype(np.int64),
        "timestamps": series["timestamp"][:rows] + EPICS_EPOCH,
        key: np.column_stack(positions) if len(positions) > 1 else positions[0],
        "technique": technique,
        "start": dict(start),
        "plan_name": start.get("plan_name", ""),
        "uid": start["uid"],
        "scan_id": int(start.get("scan_id") or 0),
        "exit_status": (stop or {}).get("exit_status", ""),
        "num_events": int(((stop or {}).get("num_events") or {}).get(STREAM, rows)),
        "complete": stop is not None,
        "reason": (stop or {}).get("reason", ""),
        "path": ref,
    }


@dataclass
class _Seen:
    summary: tuple[str, int] | None  # (technique, frames); None: not usable
    started: float  # the start document's time


class TiledRuns:
    """The runs a Tiled server holds that can be trained on, for the retraining and its
    policy.  :meth:`usable` asks only for runs it has not seen finished (those started
    since the newest it saw, and those still running): a poll costs one small query
    however long the beamtime.

    Parameters
    ----------
    client : tiled container
        The catalog of runs (:func:`connect`).
    """

    def __init__(self, client):
        self.client = client
        self._seen: dict[str, _Seen] = {}
        self._warned: set[tuple[str, str]] = set()
        self.reads = 0

    def ref(self, uid: str) -> str:
        return run_ref(self.client, uid)

    def _since(self) -> float:
        """Runs started after this are asked for: the oldest one not finished, else the
        newest seen."""
        pending = [s.started for s in self._seen.values() if s.summary is None]
        if pending:
            return min(pending) - 1e-3
        return max((s.started for s in self._seen.values()), default=0.0)

    def usable(self, min_frames: int = 1) -> list[tuple[str, str, int]]:
        """(reference, technique, frames) of the finished runs of a known technique with
        at least ``min_frames`` frames, newest first."""
        from tiled.queries import In, Key

        found = self.client.search(In("start.technique", list(POSITIONS))).search(
            Key("start.time") >= self._since()
        )
        for uid, node in found.items():
            seen = self._seen.get(uid)
            if seen is not None and seen.summary is not None:
                continue  # finished when seen: it does not change
            self._seen[uid] = self._look(uid, node)
        done = [(s.started, uid, s.summary) for uid, s in self._seen.items() if s.summary]
        return [
            (self.ref(uid), technique, n)
            for _, uid, (technique, n) in sorted(done, reverse=True)
            if n >= min_frames
        ]

    def _look(self, uid: str, node) -> _Seen:
        self.reads += 1
        start = node.metadata["start"]
        started = float(start.get("time", 0.0))
        problem = None
        if node.metadata.get("stop") is None:
            problem = "still running (no stop document)"
        else:
            try:
                stream = node[STREAM]
                image = _image_key(stream)
                shape = stream[image].shape
                return _Seen((start["technique"], int(np.prod(shape[:-2]))), started)
            except (KeyError, ValueError) as exc:
                problem = str(exc)
        if problem.startswith("still"):
            return _Seen(None, started)
        if (uid, problem) not in self._warned:
            self._warned.add((uid, problem))
            log.warning("skipping run %s: %s", uid, problem)
        return _Seen((start.get("technique", ""), 0), started)  # finished, not usable
