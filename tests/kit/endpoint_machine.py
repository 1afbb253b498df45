"""A training endpoint on "another machine" of this one: ``elsewhere(hidden)``, the
initializer that puts an executor's worker process in a mount namespace of its own where
each folder of ``hidden`` (the service's data, registry, keys) is an empty tmpfs, as on a
host that does not mount them; ``can_hide()`` says whether this host allows it (root with
CAP_SYS_ADMIN)."""

import ctypes
import os
import subprocess

CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 0x40000


def can_hide() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "true"], timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def elsewhere(hidden: list[str]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # mounts made here stay here, not in the service's namespace
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    for folder in hidden:
        check(libc.mount(b"tmpfs", folder.encode(), b"tmpfs", 0, None), f"hide {folder}")
