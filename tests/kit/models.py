"""Registry versions for the tests: ``add_approved`` stores model bytes as a version and signs
it with the gate's key, as the retraining service does once its quality gate passes (an edge
loads nothing else)."""

from edgeloop import approval
from edgeloop.config import SecurityConfig
from edgeloop.registry import Registry


def add_approved(registry: Registry, data: bytes, meta: dict, security: SecurityConfig) -> int:
    version = registry.add(data, meta)
    stored = registry.meta(version)
    fields = {
        "version": version,
        "kind": stored.get("kind"),
        "arch": stored.get("arch"),
        "sha256": stored["sha256"],
        "size": stored["size"],
        "parent": None,
        "request_id": f"test-{version}",
        "labels": None,
        "labels_sha256": None,
    }
    registry.set_approval(version, approval.approve(approval.private_key(security), fields))
    return version
