"""``edgeloop tiled`` (app layer): the embedded Tiled server where runs are stored, a
SimpleTiledServer (SQLite catalog, its files under ``<data_dir>/tiled``) on loopback at the
configuration's ``[tiled] port``, reading the detector's files under ``data_dir``.  Also
:func:`wait_ready`, what the demo and the tests wait on."""

from __future__ import annotations

import logging
import threading

from edgeloop.config import Config
from edgeloop.tiled_runs import api_key, server_dir, server_uri
from edgeloop.waiting import wait_until

log = logging.getLogger(__name__)


def serve(cfg: Config, stop: threading.Event | None = None) -> None:
    """Run the embedded server until ``stop`` is set (or the process is interrupted)."""
    from tiled.server import SimpleTiledServer

    if cfg.tiled.uri:
        raise ValueError(f"[tiled] uri is {cfg.tiled.uri!r}: that server is not started here")
    cfg.data_path.mkdir(parents=True, exist_ok=True)
    key = api_key(cfg.tiled, cfg.data_path, create=True)
    where = server_dir(cfg.data_path)
    with SimpleTiledServer(
        directory=where, api_key=key, port=cfg.tiled.port, readable_storage=[cfg.data_path]
    ):
        log.info("Tiled serves %s (catalog and logs in %s)", server_uri(cfg.tiled), where)
        print(f"tiled: serving {server_uri(cfg.tiled)}", flush=True)
        stop = stop or threading.Event()
        while not stop.wait(1.0):
            pass


def wait_ready(cfg: Config, timeout: float = 60.0, proc=None) -> None:
    """Until the server answers its health check; raise with the process's output if it
    exits or never does."""
    import httpx

    url = server_uri(cfg.tiled).removesuffix("/api/v1") + "/healthz"

    def answers() -> bool:
        try:
            with httpx.Client(trust_env=False) as client:
                if client.get(url, timeout=2.0).status_code == 200:
                    return True
        except httpx.HTTPError:
            pass
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.output()[-3000:]}")
        return False

    tail = (lambda: proc.output()[-3000:]) if proc is not None else (lambda: "")
    wait_until(answers, timeout, f"Tiled at {url}", 0.2, tail)
