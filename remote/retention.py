"""What the retraining service keeps over a beamtime (the configuration's [retention]):
``prune(cfg, registry)`` after each retraining, ``disk_free_gb(cfg)`` for ml:DiskFree,
``tree_bytes(folder)`` (also the soak's measure of the registry).

Left alone, a beamtime fills the disk the scans go to: a labels file per retraining (~0.2 GB
per 4,000 frames), the labels cache, Parsl run directories and every model version. Kept:
- model versions: of each kind the serving one, the one before it and the ``keep_best``
  accepted ones by validation loss; every other version's weights are deleted and its
  metadata marked ``pruned`` (its provenance stays);
- labels files: the newest, up to ``labels_gb``;
- the labels cache: the most recently written entries, up to ``cache_gb``;
- Parsl run directories: the newest ``parsl_runs``.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edgeloop.config import MODE_KIND, Config
from edgeloop.registry import ModelFileError, Registry, RegistryCorrupt

log = logging.getLogger(__name__)

GB = 1e9


@dataclass
class Pruned:
    versions: list[int] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    freed_bytes: int = 0

    def __str__(self) -> str:
        return (
            f"retention: {len(self.versions)} model version(s) and {len(self.files)} file(s) "
            f"deleted, {self.freed_bytes / GB:.2f} GB freed"
        )


def kept_versions(cfg: Config, registry: Registry) -> set[int]:
    """The versions whose weights stay: of each kind the serving, the previous and the
    best ``keep_best``."""
    keep: set[int] = set()
    for kind in set(MODE_KIND.values()):
        history = registry.accepted_history(kind)
        keep.update(history[-2:])
        keep.update(registry.ranked(kind)[: cfg.retention.keep_best])
    return keep


def prune(cfg: Config, registry: Registry) -> Pruned:
    """Delete what [retention] does not keep; what was deleted. A record of accepted
    versions that cannot be read prunes no model (which ones serve is unknown)."""
    done = Pruned()
    try:
        keep = kept_versions(cfg, registry)
    except RegistryCorrupt as exc:
        log.error("retention: no model version pruned: %s", exc)
    else:
        for version in registry.versions():
            if version not in keep:
                _prune_version(registry, version, done)
    work = cfg.registry_path / "work"
    _keep_newest(sorted(work.glob("labels_*.h5")), cfg.retention.labels_gb * GB, done)
    _keep_newest(sorted((work / "labels_cache").glob("*.h5")), cfg.retention.cache_gb * GB, done)
    _keep_newest_dirs(work / "parsl", cfg.retention.parsl_runs, done)
    if done.versions or done.files:
        log.info("%s", done)
    return done


def _prune_version(registry: Registry, version: int, done: Pruned) -> None:
    weights = registry.root / f"v{version:04d}.pt"
    try:
        meta = registry.meta(version)
    except ModelFileError:
        return  # not ours to judge: the registry skips it already
    if meta.get("pruned") or not weights.exists():
        return
    size = weights.stat().st_size
    registry.set_pruned(version)
    weights.unlink(missing_ok=True)
    done.versions.append(version)
    done.freed_bytes += size


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _keep_newest(files: list[Path], budget: float, done: Pruned) -> None:
    """The newest files while they fit in ``budget`` bytes (the newest always)."""
    total = 0
    for i, path in enumerate(sorted(files, key=_mtime, reverse=True)):
        try:
            size = path.stat().st_size
        except OSError:
            continue
        total += size
        if i and total > budget:
            path.unlink(missing_ok=True)
            done.files.append(str(path))
            done.freed_bytes += size


def _keep_newest_dirs(root: Path, keep: int, done: Pruned) -> None:
    if not root.is_dir():
        return
    runs = sorted((p for p in root.iterdir() if p.is_dir()), key=_mtime, reverse=True)
    for run in runs[keep:]:
        size = tree_bytes(run)
        shutil.rmtree(run, ignore_errors=True)
        done.files.append(str(run))
        done.freed_bytes += size


def tree_bytes(folder: Path) -> int:
    """The bytes of the files under ``folder`` (a file removed meanwhile is skipped)."""
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:
            pass
    return total


def disk_free_gb(cfg: Config) -> float:
    """Free space on the fuller of the data and the registry filesystems, GB."""
    free = []
    for path in (cfg.data_path, cfg.registry_path):
        while not path.exists() and path != path.parent:
            path = path.parent  # not made yet: its filesystem is its parent's
        free.append(shutil.disk_usage(path).free)
    return min(free) / GB
