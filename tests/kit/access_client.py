"""A CA or PVA client that writes one PV as another Unix user, for the access tests.

``python access_client.py USER ca|pva PV JSON-VALUE`` prints one JSON line: ``{"ok": bool,
"error": str}``.  Started as root, it imports its client libraries, then drops to USER (its
groups too) before it connects: the interpreter may live where USER cannot read (a pyenv
under /root), and the server then sees a client really running as USER.  CA clients send the
user name from the environment (caproto: getpass), so the caller also sets USER/LOGNAME."""

import encodings.idna  # noqa: F401  (imported lazily by socket, unreadable once dropped)
import json
import os
import pwd
import sys

from caproto.sync.client import write as ca_write
from p4p.client.thread import Context


def drop_to(user: str) -> None:
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def put(protocol: str, pv: str, value) -> dict:
    if protocol == "ca":
        # notify=True: the server answers the write with its status; write does not raise
        status = ca_write(pv, value, notify=True, timeout=5, repeater=False).status
        return {"ok": status.name == "ECA_NORMAL", "error": f"{status.name}: {status.description}"}
    ctx = Context("pva", nt=False)
    try:
        ctx.put(pv, value, timeout=5, wait=True)
        return {"ok": True, "error": ""}
    except Exception as exc:
        return {"ok": False, "error": str(exc)}
    finally:
        ctx.close()


if __name__ == "__main__":
    user, protocol, pv, value = sys.argv[1:4] + [json.loads(sys.argv[4])]
    drop_to(user)
    print(json.dumps(put(protocol, pv, value)), flush=True)
