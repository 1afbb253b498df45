"""The real areaDetector simDetector IOC of ``../shared/adsim`` (C++ ADCore, EPICS base 7) for
the system tier: ``real_sim_detector`` starts it on loopback with CA on the port reserved for
it (``ca_port("adsim")``) and PVA on ports of its own, ready once its ``cam1:Acquire`` answers,
and stops its whole process group (the IOC and the ``tail`` that holds its stdin open).
``served_records`` reads what a CA client sees of records (type, count, enum strings)."""

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from caproto.sync.client import read

from edgeloop.waiting import wait_until
from tests.kit.env import ADCORE_DB, DEADLINE_SLACK, TEST_ENV, ca_port, free_port

RUN_IOC = ADCORE_DB.parent / "run-ioc"
# Debian's runtime libraries the IOC links to (its README); `make system-deps` installs them
LIBRARIES = ("libhdf5_serial.so.103", "libblosc.so.1", "libsz.so.2")


@dataclass
class RealIoc:
    prefix: str  # e.g. "Tr1a2b3c:det:"
    pva_address: str  # where a PVA client searches for it (add to EPICS_PVA_ADDR_LIST)
    log: Path


def missing_libraries() -> list[str]:
    """The runtime libraries the IOC needs that this machine lacks."""
    out = subprocess.run(
        ["ldd", str(ADCORE_DB.parent / "bin" / "simDetectorApp")], capture_output=True, text=True
    ).stdout
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


@contextlib.contextmanager
def real_sim_detector(tmp: Path, prefix: str, size: tuple[int, int] = (64, 64), dtype: int = 3):
    """The real simDetector IOC serving ``prefix`` (``cam1:``, ``HDF1:``, ``Codec1:``,
    ``Pva1:Image``, ``Pva2:Image``), stopped on exit; its console output in ``tmp``."""
    missing = missing_libraries()
    assert not missing, f"the real IOC lacks {missing}: run `make system-deps`"
    pva_server, pva_udp = free_port(), free_port()
    env = dict(
        os.environ,
        **TEST_ENV,
        TMPDIR=str(tmp),
        EPICS_CA_SERVER_PORT=str(ca_port("adsim")),
        EPICS_PVAS_SERVER_PORT=str(pva_server),
        EPICS_PVAS_BROADCAST_PORT=str(pva_udp),
    )
    log = tmp / "real-ioc.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(RUN_IOC), prefix, str(size[1]), str(size[0]), str(dtype)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def answers() -> bool:
            assert proc.poll() is None, f"the real IOC exited:\n{log.read_text()[-3000:]}"
            try:
                read(f"{prefix}cam1:Acquire", timeout=1, repeater=False)
            except TimeoutError:
                return False
            return True

        wait_until(answers, 20 * DEADLINE_SLACK, f"{prefix}cam1:Acquire", 0.2)
        yield RealIoc(prefix, f"127.0.0.1:{pva_udp}", log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def served_records(names: list[str]) -> dict[str, dict]:
    """What a CA client sees of each record: ``type`` (the native DBR type's name without
    DBR_), ``count`` and, for enums, ``enum_strings``; a name that does not connect is left
    out."""
    from caproto.threading.client import Context

    ctx = Context()
    try:
        pvs = ctx.get_pvs(*names, timeout=5)
        try:  # all that will connect do so together; the rest are missing
            wait_until(lambda: all(pv.connected for pv in pvs), 10 * DEADLINE_SLACK, "records")
        except TimeoutError:
            pass
        seen = {}
        for pv in (pv for pv in pvs if pv.connected):
            kind = pv.channel.native_data_type.name
            view = {"type": kind, "count": pv.channel.native_data_count}
            if kind == "ENUM":
                meta = pv.read(data_type="control", timeout=5 * DEADLINE_SLACK).metadata
                view["enum_strings"] = [s.decode() for s in meta.enum_strings]
            seen[pv.name] = view
        return seen
    finally:
        ctx.disconnect()
