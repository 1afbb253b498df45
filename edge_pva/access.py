"""Who may write the edge's own PVs (edge:LoadModel): the rule db/ml.acf applies to the ML
IOC's control records, from the same ``security`` configuration.

A put is allowed when the client's account is an operator or the service user and, when hosts
are configured, its address is one of theirs.  As the IOC does with asCheckClientIP=1, host
names are resolved to addresses once, at start, and matched against the client's real
address (``op.peer()``), never against a name the client claims."""

from __future__ import annotations

import getpass
import ipaddress
import logging
import socket
import threading

from edgeloop.config import SecurityConfig

log = logging.getLogger(__name__)


def peer_address(peer: str) -> str:
    """``127.0.0.1:5075``, ``[::1]:5075`` or ``[::ffff:127.0.0.1]:5075`` -> the address."""
    host = peer
    if peer.startswith("["):
        host = peer[1 : peer.index("]")]
    elif peer.count(":") == 1:
        host = peer.rsplit(":", 1)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def resolve(hosts: tuple[str, ...]) -> set[str]:
    """Every address of each host; a host that does not resolve is warned about and never
    matches."""
    addresses: set[str] = set()
    for host in hosts:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError as exc:
            log.warning("access: host %r does not resolve (%s): never matches", host, exc)
            continue
        addresses |= {peer_address(info[4][0]) for info in infos}
    return addresses


class WriteAccess:
    """Decides whether a p4p server operation (a put) may change what is served."""

    def __init__(self, security: SecurityConfig | None = None):
        security = security or SecurityConfig()
        user = getpass.getuser()
        self.operators = tuple(security.operators) or (user,)
        self.service_user = security.service_user or user
        self.hosts = tuple(security.hosts)
        self.addresses = resolve(self.hosts) if self.hosts else None
        self.refused = 0
        self._lock = threading.Lock()

    def refusal(self, op) -> str | None:
        """None when ``op`` may write; otherwise why not (also logged and counted)."""
        user, address = op.account(), peer_address(op.peer())
        if user not in self.operators and user != self.service_user:
            reason = f"user {user!r} is not an operator"
        elif self.addresses is not None and address not in self.addresses:
            reason = f"host {address} is not one of {', '.join(self.hosts)}"
        else:
            return None
        with self._lock:
            self.refused += 1
        message = f"write to {op.name()} not permitted: {reason}"
        log.warning("access: %s (from %s)", message, op.peer())
        return message


class LoadModelPut:
    """edge:LoadModel's put handler (and a worker's RevertModel's, ``action="revert"``): the
    access rule, then a version number >= 1, queued as (action, version, operation) for the
    loader thread (which completes it)."""

    def __init__(self, requests, security: SecurityConfig, action: str = "load"):
        self.requests, self.action = requests, action
        self.access = WriteAccess(security)  # the rule db/ml.acf gives the IOC

    def put(self, pv, op):
        refusal = self.access.refusal(op)
        if refusal is not None:
            op.done(error=refusal)
            return
        try:
            version = int(op.value())
        except (TypeError, ValueError):
            op.done(error="write a model version number (integer >= 1)")
            return
        if version < 1:
            op.done(error=f"model version must be >= 1, got {version}")
            return
        self.requests.put((self.action, version, op))
