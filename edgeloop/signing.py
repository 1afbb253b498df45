"""HMAC-SHA256 signatures on the models a training endpoint returns (core).

The key is a file (``security.signing_key_file``, mode 0600) holding the same secret on the
retraining service's machine and on the training endpoint's; only its path travels in a
request.  The signature covers the model bytes and the metadata the service acts on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path

from edgeloop.config import SecurityConfig
from edgeloop.registry import atomic_write

DEFAULT_KEY_FILE = SecurityConfig().signing_key_file
# the request id, the labels' and the initial model's checksums: a result signed for another
# request (replayed from a shared staging area, say) does not verify for this one
SIGNED_FIELDS = (
    "kind",
    "arch",
    "val_loss",
    "n_frames",
    "request_id",
    "labels_sha256",
    "init_sha256",
)
MIN_KEY_CHARS = 32


class SigningError(RuntimeError):
    """A missing, unsafe or wrong signing key, or a model whose signature does not verify."""


def _how_to(path: Path) -> str:
    return (
        f"put the same key in {path} on the service's and the endpoint's machine: "
        f"python -c 'import secrets; print(secrets.token_hex(32))' > {path}; chmod 600 {path} "
        "(or set security.signing_key_file)"
    )


def secret_problem(path: Path, st: os.stat_result) -> str | None:
    """Why a key file cannot be trusted: readable by group or others, owned by another user,
    or in a directory that others may write (they could replace it); None if it can."""
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (
            f"is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"refused: chmod 600 {path}"
        )
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}); refused"
    parent = path.parent.stat()
    if parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not parent.st_mode & stat.S_ISVTX:
        return (
            f"is in {path.parent}, which group or others may write (mode "
            f"{stat.S_IMODE(parent.st_mode):04o}): anyone there could replace it; refused"
        )
    return None


def create_key(path: str | os.PathLike) -> bytes:
    """Write a new random key (32 bytes, hex) to ``path``, mode 0600; never overwrites."""
    path = Path(path).expanduser()
    atomic_write(path, (secrets.token_hex(32) + "\n").encode(), overwrite=False, dir_mode=0o700)
    return load_key(path)


def load_key(path: str | os.PathLike, create_default: bool = False) -> bytes:
    """The key in ``path`` (its content, surrounding whitespace ignored).

    Refused with a SigningError naming the file and what to do: missing (unless
    ``create_default`` and ``path`` is the default, which is then created), readable by
    group or others, or shorter than 32 characters."""
    given = str(path)
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        if create_default and path == Path(DEFAULT_KEY_FILE).expanduser():
            try:
                return create_key(path)
            except FileExistsError:  # created meanwhile by another process
                return load_key(path)
        raise SigningError(f"signing key file {given} not found; {_how_to(path)}") from None
    except OSError as exc:
        raise SigningError(f"signing key file {given} unreadable: {exc}") from exc
    problem = secret_problem(path, st)
    if problem:
        raise SigningError(f"signing key file {given} {problem}")
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise SigningError(f"signing key file {given} unreadable: {exc}") from exc
    if len(key) < MIN_KEY_CHARS:
        raise SigningError(
            f"signing key file {given} holds {len(key)} characters, fewer than "
            f"{MIN_KEY_CHARS}; {_how_to(path)}"
        )
    return key


def signed_fields(meta: dict) -> bytes:
    """The metadata that is signed, as canonical JSON."""
    missing = [k for k in SIGNED_FIELDS if k not in meta]
    if missing:
        raise SigningError(f"cannot sign: metadata lacks {missing}")
    fields = {k: meta[k] for k in SIGNED_FIELDS}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(key: bytes, model: bytes, meta: dict) -> str:
    """HMAC-SHA256 (hex) over the metadata's signed fields and the model bytes."""
    fields = signed_fields(meta)
    mac = hmac.new(key, digestmod=hashlib.sha256)
    mac.update(len(fields).to_bytes(8, "big"))  # so no bytes can move from one to the other
    mac.update(fields)
    mac.update(model)
    return mac.hexdigest()


def verify(key: bytes, model: bytes, meta: dict, signature) -> None:
    """SigningError unless ``signature`` is this key's signature of ``model`` and ``meta``."""
    if not isinstance(signature, str) or not signature:
        raise SigningError("the returned model is unsigned (no signature)")
    if not hmac.compare_digest(sign(key, model, meta), signature):
        raise SigningError(
            "the returned model's signature does not verify: the model or its metadata "
            "was altered, or the endpoint's signing key differs from the service's"
        )
