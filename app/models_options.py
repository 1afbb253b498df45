"""The options of ``edgeloop models`` (the command is models_cli.py): apart from it, so that
building the command line, which every ``edgeloop`` command does, imports no torch."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

ACTIONS = ("list", "show", "export", "verify", "record", "push")


def _date(text: str) -> float:
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (YYYY-MM-DD[THH:MM])") from None


def _where(text: str) -> tuple[str, str, float]:
    from edgeloop.model_records import parse_where  # only for --where: it imports torch

    try:
        return parse_where(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        choices=ACTIONS,
        help="list: the registry's versions; show VERSION: its model card; export VERSION: "
        "its record as one .tar.gz; verify [VERSION|FOLDER|ARCHIVE ...]: checksums and the "
        "gate's signatures (default: every record); record VERSION ...: (re)write records; "
        "push: make the MLflow registry of records.mlflow_uri agree with the records",
    )
    p.add_argument("targets", nargs="*", help="versions, or record folders/archives to verify")
    p.add_argument("--kind", choices=("ptychonn", "braggnn"), help="list: only this kind")
    p.add_argument(
        "--status", choices=("accepted", "rejected", "candidate"), help="list: only this status"
    )
    p.add_argument(
        "--where",
        type=_where,
        action="append",
        default=[],
        help="list: a metric condition, e.g. 'val_loss<0.01' (repeatable)",
    )
    p.add_argument("--since", type=_date, help="list: created on or after (YYYY-MM-DD)")
    p.add_argument("--until", type=_date, help="list: created before (YYYY-MM-DD)")
    p.add_argument("--json", action="store_true", help="list, show: JSON instead of text")
    p.add_argument("--out", type=Path, default=Path("."), help="export: file or folder")
    p.add_argument(
        "--key",
        type=Path,
        help="verify: the gate's public key to trust (default: the configured gate.pub; "
        "none there: each record's own, which proves only that it is whole)",
    )
