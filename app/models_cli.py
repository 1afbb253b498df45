"""``edgeloop models list|show|export|verify|record``: the model records of the registry
(edgeloop/model_records.py) for people and scripts; its options are in models_options.py."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from edgeloop import approval
from edgeloop import model_records as records
from edgeloop.config import Config


def _version(text: str) -> int:
    try:
        return int(text.lstrip("v"))
    except ValueError:
        sys.exit(f"edgeloop models: not a version number: {text!r}")


def _one(args) -> int:
    if len(args.targets) != 1:
        sys.exit(f"edgeloop models {args.action}: give one version")
    return _version(args.targets[0])


def run(cfg: Config, args) -> None:
    try:
        {"list": _list, "show": _show, "export": _export, "verify": _verify,
         "record": _record, "push": _push}[args.action](cfg, args)  # fmt: skip
    except records.RecordError as exc:
        sys.exit(f"edgeloop models {args.action}: {exc}")


def _list(cfg: Config, args) -> None:
    rows = records.listing(cfg, args.kind, args.status, args.where, args.since, args.until)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'version':>7}  {'kind':9} {'status':10} {'created':20} {'val_loss':>10}  record")
    for r in rows:
        loss = f"{r['val_loss']:.4g}" if isinstance(r["val_loss"], int | float) else "-"
        print(
            f"{r['version']:>7}  {r['kind']!s:9} {r['status']:10} "
            f"{records.iso(r['created']) or '-':20} {loss:>10}  {r['record'] or '-'}"
        )


def _show(cfg: Config, args) -> None:
    folder = records.find(cfg, _one(args))
    name = "card.json" if args.json else "README.md"
    print((folder / name).read_text())


def _export(cfg: Config, args) -> None:
    folder = records.find(cfg, _one(args))
    verdict = records.verify_record(folder, _trusted_key(cfg, args))
    if not verdict.ok:
        sys.exit(f"edgeloop models export: {folder} fails its checks: {verdict.problems}")
    print(records.export_record(folder, args.out))


def _trusted_key(cfg: Config, args) -> bytes | None:
    path = args.key or approval.key_paths(cfg.security)[1]
    try:
        return path.read_bytes()
    except OSError:
        if args.key:
            sys.exit(f"edgeloop models verify: cannot read the key {args.key}")
        return None


def _verify(cfg: Config, args) -> None:
    key = _trusted_key(cfg, args)
    folders: list[Path] = []
    with tempfile.TemporaryDirectory() as unpacked:
        for target in args.targets:
            path = Path(target)
            if path.is_dir():
                folders.append(path)
            elif path.is_file():
                folders.append(records.unpack(path, unpacked))
            else:
                folders.append(records.find(cfg, _version(target)))
        if not args.targets:
            folders = sorted(p for p in records.records_dir(cfg.registry_path).glob("*-v*"))
        failed = 0
        for folder in folders:
            verdict = records.verify_record(folder, key)
            print(f"{folder.name}: {'ok' if verdict.ok else 'FAILED'} (with {verdict.key})")
            for problem in verdict.problems:
                print(f"  {problem}")
            failed += not verdict.ok
    if not folders:
        print(f"no records in {records.records_dir(cfg.registry_path)}")
    if failed:
        sys.exit(1)


def _record(cfg: Config, args) -> None:
    if not args.targets:
        sys.exit("edgeloop models record: give the versions")
    for target in args.targets:
        print(records.write_record(cfg, _version(target)))


def _push(cfg: Config, args) -> None:
    from edgeloop.remote import mlflow_registry

    if not cfg.records.mlflow_uri:
        sys.exit("edgeloop models push: no MLflow server configured (records.mlflow_uri)")
    for kind, versions in mlflow_registry.sync(cfg).items():
        pairs = ", ".join(f"v{v} -> {m}" for v, m in sorted(versions.items()))
        print(f"{mlflow_registry.model_name(kind)}: {pairs}")
