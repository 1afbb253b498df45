"""The tests' network settings and the one allocator of their ports and PV prefixes.

- ``CA_PORTS``: the Channel Access port of every simulated beamline a test may start beside
  another (two CA servers on one host cannot share a port for unicast searches); each is in
  ``TEST_ENV``'s ``EPICS_CA_ADDR_LIST``, so in-process clients find it;
- ``ca_port(name)``, ``free_port()`` (a loopback port free for TCP and UDP, for a server
  whose clients get the port explicitly), ``random_prefix(tag)``;
- ``DEADLINE_SLACK``: how much longer than on an idle machine a test waits for a condition
  (CI machines are often loaded);
- ``TEST_ENV``: the EPICS settings every test runs with; ``SHARED_DATA``: ../shared/data;
  ``ADCORE_DB``: ADCore's templates the real IOC loaded (../shared/adsim/db).

Under pytest-xdist each worker has ports of its own (``WORKER_PORT_OFFSET``): the ML IOCs'
CA port (``EPICS_CA_SERVER_PORT``, the port clients search at addresses without one), the
simulated beamline's (``EDGELOOP_BEAMLINE_CA_PORT``; children inherit both), the embedded
Tiled server's (``EDGELOOP_TILED_PORT``) and every port
in ``CA_PORTS`` move by 100 per worker.  Within a worker the ML IOCs share their port: CA
servers on one port (SO_REUSEPORT, caproto's and the IOC's alike) each get a share of the
unicast searches by a hash of the client's address, so a client may find one and never the
other. The tests reach those ML IOCs over PVA (pvxs passes unicast searches on to every
server on the host); a CA client of an ML IOC talks to the session's loop, to a loop beside
it on ports of its own (``LOOP_CA_PORTS``, ``loop_ca_env``), or to one on a port of its own
(test_access)."""

import os
import secrets
import socket
import sys
from pathlib import Path

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # "gw<N>" under xdist
WORKER_PORT_OFFSET = 100 * int(WORKER.removeprefix("gw") or 0)
assert "edgeloop.config" not in sys.modules, "the worker's CA port is set before edgeloop.config"
os.environ["EDGELOOP_BEAMLINE_CA_PORT"] = str(5066 + WORKER_PORT_OFFSET)
os.environ["EDGELOOP_TILED_PORT"] = str(8437 + WORKER_PORT_OFFSET)  # embedded Tiled servers
if WORKER_PORT_OFFSET:  # the first worker, and a run without xdist, keep the standard 5064
    os.environ["EPICS_CA_SERVER_PORT"] = str(5064 + WORKER_PORT_OFFSET)

from edgeloop.config import BEAMLINE_CA_PORT, LOOPBACK_ENV  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
ADCORE_DB = SHARED_DATA.parent / "adsim" / "db"  # the templates the real simDetector IOC loaded
KIT = Path(__file__).resolve().parent  # the scripts tests run as processes live here too

DEADLINE_SLACK = 3

CA_PORTS = {
    "beamline": BEAMLINE_CA_PORT,  # the session's whole loop
    "second_beamline": BEAMLINE_CA_PORT + 1,  # a loop beside it
    "soak": BEAMLINE_CA_PORT + 2,
    "area_detector": BEAMLINE_CA_PORT + 3,
    "area_detector_own": BEAMLINE_CA_PORT + 4,
    "run_index": BEAMLINE_CA_PORT + 5,
    "adsim": BEAMLINE_CA_PORT + 6,  # the real simDetector IOC (tests/kit/real_ad.py)
    "second_ml": BEAMLINE_CA_PORT + 7,  # the ML IOC of the loop beside the session's
}
# a whole loop's (beamline, ML IOC) ports: None is the worker's EPICS_CA_SERVER_PORT
LOOP_CA_PORTS = {
    "beamline": ("beamline", None),
    "second_beamline": ("second_beamline", "second_ml"),
}

TEST_ENV = dict(
    LOOPBACK_ENV,
    EPICS_CA_ADDR_LIST=" ".join(
        [LOOPBACK_ENV["EPICS_CA_ADDR_LIST"]]
        + [f"127.0.0.1:{port}" for name, port in CA_PORTS.items() if name != "beamline"]
    ),
)


def ca_port(name: str) -> int:
    """The CA port reserved for ``name`` (a key of ``CA_PORTS``)."""
    return CA_PORTS[name]


def loop_ca_env(loop: str) -> dict[str, str]:
    """The environment that puts a whole loop's IOCs on the ports ``LOOP_CA_PORTS[loop]``
    (its clients, started with it, search there)."""
    beamline, ml = LOOP_CA_PORTS[loop]
    env = {"EDGELOOP_BEAMLINE_CA_PORT": str(CA_PORTS[beamline])}
    if ml is not None:
        env["EPICS_CA_SERVER_PORT"] = str(CA_PORTS[ml])
    return env


def free_port() -> int:
    """A port free for both TCP and UDP on loopback (a CA server binds both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                if port not in CA_PORTS.values():
                    return port


def random_prefix(tag: str) -> str:
    """A PV prefix no other test uses: ``T<tag><6 hex digits>:``."""
    return f"T{tag}{secrets.token_hex(3)}:"
