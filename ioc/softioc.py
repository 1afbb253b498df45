"""The real EPICS IOC (EPICS base soft IOC with CA, and PVA through pvxs QSRV2) that
serves db/*.db with an access-security file.

``python -m edgeloop.ioc.softioc -m P=SIM: -d db/ml.db -a db/ml.acf -s 'OPERATORS="me,you"'``
runs until SIGINT/SIGTERM or, when stdin is a pipe, until end of input; it needs no stdin.
``start()`` runs it as a subprocess and waits for ``iocRun: All initialization complete``.
"""

from __future__ import annotations

import argparse
import ctypes
import getpass
import os
import queue
import re
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path

from edgeloop.config import PolicyConfig, RetentionConfig, SecurityConfig

READY = "iocRun: All initialization complete"


def db_dir() -> Path:
    return Path(str(resources.files("edgeloop.db")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--macros", default="", help="record macros, e.g. P=SIM:")
    parser.add_argument("-d", "--database", action="append", default=[], help=".db file")
    parser.add_argument("-a", "--acf", help="access security file (.acf)")
    parser.add_argument("-s", "--acf-subs", default="", help="acf substitutions")
    args = parser.parse_args(argv)

    os.environ.setdefault("PVXS_QSRV_ENABLE", "YES")
    import pvxslibs.path
    from epicscorelibs import ioc as base_ioc

    if args.acf:
        # match HAG entries against the client's address, not the host name a CA client
        # claims (QSRV2 knows only the address); names in the ACF are resolved at load
        ctypes.c_int.in_dll(base_ioc.Com, "asCheckClientIP").value = 1
        base_ioc.dbCore.asSetFilename(str(Path(args.acf).resolve()).encode())
        if args.acf_subs:
            base_ioc.dbCore.asSetSubstitutions(args.acf_subs.encode())
    base_ioc.start_ioc(
        dbs=[(d, args.macros) for d in args.database],
        extra_dbd_load=(("pvxsIoc.dbd", pvxslibs.path.dbd_path),),
        extra_dso_load=("pvxslibs.lib.pvxsIoc",),
    )
    sys.stderr.flush()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stdin_open = _stdin_is_pipe()
    while not stop.is_set():
        if stdin_open:
            ready, _, _ = select.select([sys.stdin], [], [], 0.2)
            if ready and not sys.stdin.readline():
                break  # end of input, like the IOC shell
        else:
            stop.wait(0.2)


def _stdin_is_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(0).st_mode)
    except OSError:
        return False


# what an ACF accepts unquoted as a user or host name
_ACF_NAME = re.compile(r"[A-Za-z0-9_+:.\[\]<>;-]+")


def acf_substitutions(security: SecurityConfig | None = None) -> str:
    """Macros of db/ml.acf: users and hosts as quoted lists (macLib splits an unquoted
    value at its commas); no hosts: any host."""
    security = security or SecurityConfig()
    user = getpass.getuser()
    groups = {
        "OPERATORS": security.operators or (user,),
        "SERVICE": (security.service_user or user,),
    }
    if security.hosts:
        groups["HOSTS"] = security.hosts
    for key, names in groups.items():
        bad = [name for name in names if not _ACF_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"{key.lower()}: not a user or host name: {bad}")
    subs = [f'{key}="{",".join(names)}"' for key, names in groups.items()]
    if not security.hosts:
        subs.append('ANYHOST="#"')
    return ",".join(subs)


def policy_macros(policy: PolicyConfig | None = None) -> str:
    """Macros of db/ml.db's policy records: what the IOC starts with."""
    policy = policy or PolicyConfig()
    return (
        f"AUTO={int(policy.enabled)},AUTO_THRESHOLD={policy.threshold:g},"
        f"AUTO_THRESHOLD_PX={policy.threshold_px:g},"
        f"AUTO_INTERVAL={policy.min_interval_s:g},AUTO_FRAMES={policy.min_new_frames}"
    )


def retention_macros(retention: RetentionConfig | None = None) -> str:
    """Macros of ml:DiskFree's alarm limits."""
    retention = retention or RetentionConfig()
    return f"DISK_MINOR_GB={retention.disk_minor_gb:g},DISK_MAJOR_GB={retention.disk_major_gb:g}"


def command(
    prefix: str,
    security: SecurityConfig | None = None,
    policy: PolicyConfig | None = None,
    retention: RetentionConfig | None = None,
) -> list[str]:
    return [
        sys.executable,
        "-u",
        "-m",
        "edgeloop.ioc.softioc",
        "-m",
        f"P={prefix},{policy_macros(policy)},{retention_macros(retention)}",
        "-d",
        str(db_dir() / "ml.db"),
        "-a",
        str(db_dir() / "ml.acf"),
        "-s",
        acf_substitutions(security),
    ]


def start(
    prefix: str,
    env: dict | None = None,
    timeout: float = 30.0,
    security: SecurityConfig | None = None,
    policy: PolicyConfig | None = None,
    retention: RetentionConfig | None = None,
) -> subprocess.Popen:
    """Start the real IOC and return once it reports initialization complete; only the
    users and hosts of ``security`` may write (db/ml.acf)."""
    # stdin is a pipe we hold: if this process dies, the IOC sees end of input and exits
    proc = subprocess.Popen(
        command(prefix, security, policy, retention),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    return wait_ready(proc, timeout)


def wait_ready(proc: subprocess.Popen, timeout: float) -> subprocess.Popen:
    """``proc`` once it prints READY; killed and RuntimeError with its output after
    ``timeout`` s, even when it hangs in the middle of a line (a thread reads it)."""
    lines: queue.Queue = queue.Queue()
    ready = threading.Event()
    threading.Thread(target=_read, args=(proc.stdout, lines, ready), daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:  # it exited
            break
        seen.append(line)
        if READY in line:
            ready.set()
            return proc
    proc.kill()
    proc.wait()
    try:  # what it printed last, a line it never ended included
        while (line := lines.get(timeout=1.0)) is not None:
            seen.append(line)
    except queue.Empty:
        pass
    raise RuntimeError(f"EPICS IOC did not start within {timeout:.0f} s:\n" + "".join(seen))


def _read(stream, lines: queue.Queue, ready: threading.Event) -> None:
    """Lines to ``lines`` until ``ready``, then to stderr (the IOC's log)."""
    for line in stream:
        if ready.is_set():
            sys.stderr.write("[ml-ioc] " + line)
        else:
            lines.put(line)
    lines.put(None)


if __name__ == "__main__":
    main()
