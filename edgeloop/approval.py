"""The gate's approval of a model version: an Ed25519 signature that the retraining service
makes with a private key that never leaves it, and that the edge checks with the public key
before it loads a version (core).

The signed fields bind the version number, the model's bytes (sha256 and size), its kind and
architecture, the version it was trained from, the retraining's request id, and the labels
the gate measured it on (path and sha256). So a version copied to another number, an old
approved file put back under a new one, a result for another request, or anything planted
in the registry without the private key does not load. The HMAC of signing.py stays for
what an endpoint returns to the service.

Keys: ``security.gate_key_file`` (private, mode 0600, the service's) and
``security.gate_public_key_file`` (the edge's copy of the public half). Left empty they are
``gate.key`` and ``gate.pub`` beside ``security.signing_key_file``, and the service creates the
pair there on first use.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edgeloop.config import SecurityConfig
from edgeloop.registry import atomic_write
from edgeloop.signing import secret_problem

APPROVED_FIELDS = (
    "version",
    "kind",
    "arch",
    "sha256",
    "size",
    "parent",
    "request_id",
    "labels",
    "labels_sha256",
)


class ApprovalError(RuntimeError):
    """A version without the gate's approval, or one whose approval does not verify."""


class GateKeyMissing(ApprovalError):
    """The key to sign or check with is not there: a setup problem, not the model's."""


def key_paths(security: SecurityConfig) -> tuple[Path, Path]:
    """(private, public) key files, as configured or beside the signing key."""
    beside = Path(security.signing_key_file).expanduser().parent
    private = Path(security.gate_key_file or beside / "gate.key").expanduser()
    public = Path(security.gate_public_key_file or private.with_name("gate.pub")).expanduser()
    return private, public


def private_key(security: SecurityConfig) -> Ed25519PrivateKey:
    """The service's private key; created with its public half when the files are the
    default ones and absent. GateKeyMissing names what to do otherwise."""
    private, public = key_paths(security)
    if not private.exists() and not security.gate_key_file:
        _create(private, public)
    try:
        problem = secret_problem(private, private.stat())
        data = private.read_bytes()
    except OSError as exc:
        raise GateKeyMissing(f"gate key {private} unreadable: {exc}") from exc
    if problem:
        raise GateKeyMissing(f"gate key {private} {problem}")
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise GateKeyMissing(f"gate key {private} is not an Ed25519 private key")
    return key


def public_key(security: SecurityConfig) -> Ed25519PublicKey:
    _, public = key_paths(security)
    try:
        data = public.read_bytes()
    except OSError as exc:
        raise GateKeyMissing(
            f"no gate public key at {public} ({exc.strerror}): the retraining service writes "
            "it beside its gate.key on first use; copy it to this host (or set "
            "security.gate_public_key_file)"
        ) from exc
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise GateKeyMissing(f"gate public key {public} unreadable: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise GateKeyMissing(f"gate public key {public} is not an Ed25519 key")
    return key


def _create(private: Path, public: Path) -> None:
    """A new pair: the private key written whole with mode 0600 in a directory of mode 0700;
    never overwrites."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        atomic_write(private, pem, overwrite=False, dir_mode=0o700)
    except FileExistsError:  # another process made one meanwhile: theirs stays
        return
    atomic_write(
        public,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def _canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def approve(key: Ed25519PrivateKey, fields: dict) -> dict:
    """The approval of one version: its signed fields and the signature (hex)."""
    missing = [k for k in APPROVED_FIELDS if k not in fields]
    if missing:
        raise ApprovalError(f"cannot approve: fields {missing} missing")
    signed = {k: fields[k] for k in APPROVED_FIELDS}
    return {"fields": signed, "signature": key.sign(_canonical(signed)).hex()}


def check(key: Ed25519PublicKey, meta: dict, version: int) -> dict:
    """The signed fields of ``version``'s approval in its metadata ``meta``, once the
    signature verifies and they name this version, its bytes and its kind; else
    ApprovalError saying which."""
    approval = meta.get("approval")
    if not isinstance(approval, dict) or not approval.get("signature"):
        raise ApprovalError(
            f"model v{version} carries no approval of the quality gate: only versions the "
            "retraining service accepted are served"
        )
    fields = approval.get("fields")
    try:
        key.verify(bytes.fromhex(str(approval["signature"])), _canonical(fields))
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise ApprovalError(
            f"model v{version}'s approval does not verify ({type(exc).__name__}): altered, or "
            "signed with another gate key than this edge's gate.pub"
        ) from exc
    for name, expected in (
        ("version", version),
        ("sha256", meta.get("sha256")),
        ("size", meta.get("size")),
        ("kind", meta.get("kind")),
    ):
        if fields.get(name) != expected:
            raise ApprovalError(
                f"model v{version}: the gate approved {name} {fields.get(name)!r}, the "
                f"registry holds {expected!r} (a file moved or replaced)"
            )
    return fields
