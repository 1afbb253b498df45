"""ADCore's record databases read as data: a parser for EPICS ``.template`` files (records,
fields, ``include``, ``$(MACRO=default)``), the Channel Access view of each record (type,
element count, enum strings, units, precision, writable), and the table of the records the
simulated detector serves, generated from ADCore's templates and committed beside this module
(``adcore_records.json``) so that a machine without ADCore serves the same set.

Regenerate after an ADCore update:
``python -m edgeloop.ioc.adcore_db PATH/TO/ADCore/ADApp/Db > ioc/adcore_records.json``."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

# where each plugin of the simulated detector sits under $(P)det:, the template ADCore loads
# there and the macros it is given beyond P, R, PORT, ADDR, TIMEOUT (the real simDetector IOC
# of ../shared/adsim loads the same: its st.cmd); simDetector.template includes ADBase's
PLUGINS = {
    "cam1:": ("simDetector.template", {}),
    "HDF1:": ("NDFileHDF5.template", {"XMLSIZE": "2048", "NDARRAY_PORT": "SIM1"}),
    "Codec1:": ("NDCodec.template", {"NDARRAY_PORT": "SIM1"}),
    "Pva1:": ("NDPva.template", {"NDARRAY_PORT": "SIM1"}),
    "Pva2:": ("NDPva.template", {"NDARRAY_PORT": "CODEC1"}),
}
TABLE = Path(__file__).with_name("adcore_records.json")

_MACRO = re.compile(r"\$[({]([A-Za-z0-9_]+)(?:=([^)}]*))?[)}]")
_TOKEN = re.compile(
    r'\s*(?:(?P<comment>#[^\n]*)|(?P<string>"(?:[^"\\]|\\.)*")|(?P<word>(?:\$[({][^)}]*[)}]|[A-Za-z0-9_:.\-+=])+)'
    r"|(?P<punct>[(){},]))"
)
_ENUM_FIELDS = ("ZR", "ON", "TW", "TH", "FR", "FV", "SX", "SV", "EI", "NI", "TE", "EL", "TV",
                "TT", "FT", "FF")  # fmt: skip
_READ_ONLY = {"ai", "bi", "mbbi", "longin", "stringin", "calc", "subArray", "fanout"}
_DOUBLE = {"ai", "ao", "calc", "calcout"}
_FTVL = {
    "CHAR": "CHAR",
    "UCHAR": "CHAR",
    "SHORT": "INT",
    "USHORT": "INT",
    "LONG": "LONG",
    "ULONG": "LONG",
    "INT64": "DOUBLE",
    "FLOAT": "FLOAT",
    "DOUBLE": "DOUBLE",
    "STRING": "STRING",
}


class TemplateError(ValueError):
    """A template that does not parse: names the file and what was expected."""


@dataclass
class Record:
    """One record of a database: its type, its name after macro expansion, its fields."""

    rtype: str
    name: str
    fields: dict[str, str] = field(default_factory=dict)

    def ca(self) -> dict:
        """What a Channel Access client sees of the record's VAL: type, count, enum strings,
        units, precision and whether a put is taken."""
        f, rtype = self.fields, self.rtype
        view: dict = {"type": "LONG", "count": 1, "writable": rtype not in _READ_ONLY}
        if rtype in _DOUBLE:
            view.update(type="DOUBLE", units=f.get("EGU", ""), precision=int(f.get("PREC", 0)))
        elif rtype in ("bi", "bo", "busy"):
            view.update(type="ENUM", enum_strings=[f.get("ZNAM", ""), f.get("ONAM", "")])
        elif rtype in ("mbbi", "mbbo"):
            strings = [f.get(p + "ST", "") for p in _ENUM_FIELDS]
            while strings and not strings[-1]:
                strings.pop()
            view.update(type="ENUM", enum_strings=strings)
        elif rtype in ("stringin", "stringout"):
            view.update(type="STRING")
        elif rtype == "waveform":
            view.update(type=_FTVL[f.get("FTVL", "DOUBLE")], count=int(f.get("NELM", 1)))
        elif rtype == "subArray":  # CA sees MALM elements (NELM is how many it takes)
            view.update(type=_FTVL[f.get("FTVL", "DOUBLE")], count=int(f.get("MALM", 1)))
        elif rtype == "asyn":
            view.update(type="LONG", writable=False)
        if "VAL" in f:
            view["value"] = f["VAL"]
        if f.get("DTYP", "").startswith("asyn") and self.name.endswith("_RBV"):
            view["writable"] = False
        return view


def expand(text: str, macros: dict[str, str]) -> str:
    """``$(NAME)`` / ``${NAME}`` / ``$(NAME=default)`` replaced; an undefined macro without a
    default is left as it is (as msi does with -V off)."""

    def one(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in macros:
            return macros[name]
        return default if default is not None else m.group(0)

    previous = None
    while previous != text:
        previous, text = text, _MACRO.sub(one, text)
    return text


def _tokens(text: str, where: str):
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip():
                raise TemplateError(f"{where}: cannot read {text[pos : pos + 40]!r}")
            return
        pos = m.end()
        if m.group("comment") is not None:
            continue
        if m.group("string") is not None:
            yield m.group("string")[1:-1]
        elif m.group("word") is not None:
            yield m.group("word")
        elif m.group("punct") is not None:
            yield m.group("punct")


def _call(tokens, where: str) -> list[str]:
    """The arguments of ``name(a, b)`` once ``name`` has been read."""
    if next(tokens, None) != "(":
        raise TemplateError(f"{where}: expected '('")
    args: list[str] = []
    for tok in tokens:
        if tok == ")":
            return args
        if tok != ",":
            args.append(tok)
    raise TemplateError(f"{where}: unterminated '('")


def parse(
    path: Path, macros: dict[str, str], include_path: list[Path] | None = None
) -> list[Record]:
    """The records of one template with its includes, macros expanded."""
    path = Path(path)
    include_path = include_path or [path.parent]
    where = str(path)
    tokens = iter(list(_tokens(expand(path.read_text(), macros), where)))
    records: list[Record] = []
    for tok in tokens:
        if tok == "include":
            name = next(tokens, "")
            found = next((d / name for d in include_path if (d / name).exists()), None)
            if found is None:
                raise TemplateError(f"{where}: include {name!r} not found in {include_path}")
            for included in parse(found, macros, include_path):
                _add(records, included)
        elif tok in ("record", "grecord"):
            rtype, name = _call(tokens, where)
            record = Record(rtype, name)
            if next(tokens, None) != "{":
                raise TemplateError(f"{where}: expected '{{' after record {name}")
            for item in tokens:
                if item == "}":
                    break
                args = _call(tokens, f"{where} record {name}")
                if item == "field":
                    record.fields[args[0]] = args[1] if len(args) > 1 else ""
            else:
                raise TemplateError(f"{where}: record {name} is not closed")
            _add(records, record)
        else:
            raise TemplateError(f"{where}: unexpected {tok!r}")
    return records


def _add(records: list[Record], record: Record) -> None:
    """A record defined again (a template overriding an included one's fields) keeps its
    first place and fields, updated by the later definition's, as the IOC does."""
    for earlier in records:
        if earlier.name == record.name:
            earlier.fields.update(record.fields)
            return
    records.append(record)


def plugin_records(db_dir: Path, template: str, macros: dict[str, str]) -> dict[str, dict]:
    """Each record of one plugin's template (``$(P)$(R)`` left out of the names) and its CA
    view, in the template's order."""
    macros = {"P": "", "R": "", "PORT": "PORT", "ADDR": "0", "TIMEOUT": "1", **macros}
    return {r.name: r.ca() for r in parse(Path(db_dir) / template, macros, [Path(db_dir)])}


def table(db_dir: Path) -> dict[str, dict[str, dict]]:
    """The whole table: plugin prefix -> record name -> CA view."""
    return {
        prefix: plugin_records(db_dir, template, macros)
        for prefix, (template, macros) in PLUGINS.items()
    }


def load_table() -> dict[str, dict[str, dict]]:
    """The committed table (no ADCore needed)."""
    return json.loads(TABLE.read_text())


if __name__ == "__main__":
    json.dump(table(Path(sys.argv[1])), sys.stdout, indent=1)
    sys.stdout.write("\n")
