"""Reference pages generated from the code at every docs build (mkdocs-gen-files), so they
cannot go stale: every PV (db/ml.db's records, the edge's PV set), every configuration key
(the pydantic sections of edgeloop/config.py: type, range, default, the comment beside it),
every command (the CLI's argparse parser), and the simulated beamline's PVs (its caproto
groups: type, choices, units, the pvproperty's doc)."""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

import mkdocs_gen_files

from edgeloop import config as config_module
from edgeloop.app.cli import build_parser
from edgeloop.config import Config, EdgeConfig
from edgeloop.edge_pva.edge_pvs import EdgePvs, LoadRequests
from edgeloop.edge_pva.scalars import scalars
from edgeloop.edge_pva.workers import WORKER_PVS

ROOT = Path(__file__).resolve().parents[1]
RECORD = re.compile(r'record\((\w+),\s*"\$\(P\)([^"]+)"\)\s*\{(.*?)\n\}', re.S)
FIELD = re.compile(r'field\((\w+),\s*"([^"]*)"\)')


def _cell(text: str) -> str:
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\n", " ")


def ml_records() -> list[str]:
    rows = ["| PV | record | description | access group |", "| --- | --- | --- | --- |"]
    for kind, name, body in RECORD.findall((ROOT / "db" / "ml.db").read_text()):
        fields = dict(FIELD.findall(body))
        description, group = _cell(fields.get("DESC", "")), fields.get("ASG", "")
        rows.append(f"| `$(P){name}` | {kind} | {description} | {group} |")
    return rows


EDGE_OTHERS = {
    "Phase": "ptycho: NTNDArray float32 per input frame, same uniqueId",
    "Amplitude": "ptycho: NTNDArray float32 per input frame, same uniqueId",
    "PhaseMap": "ptycho: NTNDArray, the stitched phase map of the current scan",
    "Peaks": "hedm: NTTable per input frame (uniqueId, peak, x, y, intensity, ...)",
    "Mode": "mode of the last frame (NTScalar string)",
    "Message": "last event, with its alarm severity (NTScalar string)",
    "LoadModel": "write a registry version: the put completes once it serves (operators)",
}


def edge_pvs() -> list[str]:
    rows = ["| PV | type | units | description |", "| --- | --- | --- | --- |"]
    pvs = EdgePvs(Config(), "ptycho", LoadRequests()).pvs
    declared = scalars(EdgeConfig())
    for name in pvs:
        if name in declared:
            s = declared[name]
            kind = {"l": "NTScalar int64", "d": "NTScalar double"}[s.code]
            rows.append(f"| `$(P)edge:{name}` | {kind} | {s.units} | {_cell(s.description)} |")
        else:
            rows.append(f"| `$(P)edge:{name}` | | | {_cell(EDGE_OTHERS[name])} |")
    return rows


def worker_pvs() -> list[str]:
    rows = ["| PV | description |", "| --- | --- |"]
    rows.append("| `$(P)edge:wK:*` | every edge PV above, worker K's own (`edge --workers N`) |")
    rows += [f"| `$(P)edge:wK:{name}` | {_cell(text)} |" for name, text in WORKER_PVS.items()]
    return rows


def _pv_type(channel) -> str:
    kind = type(channel).__name__.removeprefix("Pvproperty")
    read_only = kind.endswith("RO")
    kind = {"Char": "string", "Integer": "int", "Double": "double", "Enum": "enum"}.get(
        kind.removesuffix("RO"), kind.removesuffix("RO").lower()
    )
    return f"{kind}{' (read-only)' if read_only else ''}"


def beamline_pvs() -> list[str]:
    """Every CA PV the simulated beamline serves, from its caproto groups."""
    import numpy as np
    from p4p.server.thread import SharedPV

    from edgeloop import ntnd
    from edgeloop.ioc.beamline import Beamline

    image = SharedPV(initial=ntnd.build(np.zeros((4, 4), np.int32), 0))
    pvdb = Beamline("$(P)", Config(), image).pvdb
    rows = ["| PV | type | choices / units | what |", "| --- | --- | --- | --- |"]
    from_table = {}  # plugin -> how many of ADCore's records it serves without a role here
    for name, channel in pvdb.items():
        if getattr(channel.group, "from_adcore_table", False):
            plugin = channel.group.prefix.removeprefix("$(P)")
            from_table[plugin] = from_table.get(plugin, 0) + 1
            continue
        spec = getattr(channel, "pvspec", None)
        doc = (spec.doc if spec is not None else None) or ""
        if not doc and name.endswith("_RBV") and name[: -len("_RBV")] in pvdb:
            doc = f"readback of `{name[: -len('_RBV')]}`"
        choices = ", ".join(getattr(channel, "enum_strings", None) or ())
        units = choices or getattr(channel, "units", "") or ""
        rows.append(f"| `{name}` | {_pv_type(channel)} | {_cell(units)} | {_cell(doc)} |")
    for plugin, count in from_table.items():
        rows.append(
            f"| `$(P){plugin}*` | as ADCore | | {count} more records of ADCore's templates "
            "(`ioc/adcore_records.json`), each with ADCore's type and choices; a setpoint is "
            "stored and shown on its `_RBV` |"
        )
    rows.append(
        "| `$(P)det:Pva1:Image` | PVA NTNDArray | | frames (uniqueId, timeStamp, dimension, "
        "codec, NDAttributes Mode and SampleX/SampleY or SampleRot) |"
    )
    return rows


def _comments(cls) -> dict[str, str]:
    """The comment beside each field of a config section (above it, and at its end)."""
    source = Path(config_module.__file__).read_text().splitlines()
    tree = ast.parse("\n".join(source))
    node = next(
        n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__
    )
    out = {}
    for item in node.body:
        if not isinstance(item, ast.AnnAssign):
            continue
        lines, i = [], item.lineno - 2
        while i >= 0 and source[i].strip().startswith("#"):
            lines.insert(0, source[i].strip().lstrip("# "))
            i -= 1
        end = source[item.end_lineno - 1]
        if "  # " in end:
            lines.append(end.split("  # ", 1)[1])
        out[item.target.id] = " ".join(lines)
    return out


def _type(annotation) -> tuple[str, str]:
    """(type, range) of a field's annotation."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *meta = typing.get_args(annotation)
        bounds = []
        for m in meta:
            for c in getattr(m, "metadata", []) or [m]:
                for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                    if getattr(c, attr, None) is not None:
                        bounds.append(f"{sign} {getattr(c, attr)}")
                if getattr(c, "min_length", None):
                    bounds.append(f"length >= {c.min_length}")
        return _type(base)[0], ", ".join(bounds)
    if typing.get_origin(annotation) is typing.Literal:
        return "one of", ", ".join(f"`{a}`" for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation).replace("typing.", "")), ""


def config_rows(cls, prefix: str, default) -> list[str]:
    rows = []
    comments = _comments(cls)
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            rows += config_rows(type(value), f"{key}.", value)
            continue
        kind, bounds = _type(hints[f.name])
        shown = f"`{value!r}`" if value != "" else '`""`'
        rows.append(
            f"| `{key}` | {kind} | {bounds} | {shown} | {_cell(comments.get(f.name, ''))} |"
        )
    return rows


def configuration() -> list[str]:
    head = ["| key | type | range | default | what |", "| --- | --- | --- | --- | --- |"]
    return head + config_rows(Config, "", Config())


def commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    out = ["```", parser.format_help().rstrip(), "```"]
    for name, p in sub.choices.items():
        out += ["", f"## `edgeloop {name}`", "", "```", p.format_help().rstrip(), "```"]
    return out


def write(path: str, title: str, intro: str, *sections: tuple[str, list[str]]) -> None:
    with mkdocs_gen_files.open(path, "w") as f:
        f.write(f"# {title}\n\n{intro}\n")
        for heading, lines in sections:
            f.write(f"\n## {heading}\n\n" if heading else "\n")
            f.write("\n".join(lines) + "\n")


GENERATED = "Generated from the code by `docs/gen_reference.py` at every docs build."
write(
    "reference/pvs.md",
    "PVs",
    f"{GENERATED} Prefix `$(P)`, default `SIM:`. The simulated beamline's own PVs are on "
    "[their page](beamline-pvs.md).",
    ("ML control (db/ml.db: a real EPICS IOC, CA and PVA)", ml_records()),
    ("Edge server (edge_pva/edge_pvs.py, PVA)", edge_pvs()),
    ("Edge workers (edge_pva/workers.py, PVA)", worker_pvs()),
)
write(
    "reference/configuration.md",
    "Configuration",
    f'{GENERATED} Every key of `--config FILE.json` (nested: `{{"edge": {{"max_batch": 8}}}}`), '
    "checked by type and range when loaded and when assigned.",
    ("", configuration()),
)
write("reference/commands.md", "Commands", GENERATED, ("", commands()))
write(
    "reference/beamline-pvs.md",
    "The simulated beamline's PVs",
    f"{GENERATED} What `edgeloop ioc --simulate` serves for the simulated beamline "
    "(`ioc/`): CA from its "
    "caproto groups (stage axes after the motor record, the area detector's `det:cam1:`, "
    "`det:HDF1:`, `det:Codec1:` after ADCore's, the trajectory controller `Prof1:`), and the "
    "frames over PVA. The edge's and the ML IOC's PVs are on [their page](pvs.md).",
    ("", beamline_pvs()),
)
with mkdocs_gen_files.open("images/overview.png", "wb") as f:
    f.write((ROOT / "screens" / "overview.png").read_bytes())
