"""``edgeloop status`` (app layer): the live state of every edgeloop PV of a prefix, as a
table (name, value, units, severity, connected); the simulated beamline's too with
``--beamline``."""

from __future__ import annotations

import re
import time
from importlib import resources

import numpy as np
from p4p.client.thread import Context

from edgeloop.config import EdgeConfig, search_hint
from edgeloop.edge_pva.scalars import scalars

SEVERITIES = ("NO_ALARM", "MINOR", "MAJOR", "INVALID")
EDGE_OTHERS = ("Mode", "Message", "Phase", "Amplitude", "PhaseMap", "Peaks", "LoadModel")
# the simulated beamline's controls (CA) and frames (PVA)
BEAMLINE_CA = (
    "SampleX.RBV",
    "SampleY.RBV",
    "SampleRot.RBV",
    "det:cam1:Acquire_RBV",
    "det:cam1:Mode",
    "det:cam1:AcquireTime",
    "det:cam1:NumImages",
    "det:cam1:ArrayCounter_RBV",
    "det:cam1:StatusMessage_RBV",
    "det:Codec1:EnableCallbacks",
    "det:Codec1:Compressor",
    "det:Codec1:CompFactor_RBV",
)


def ml_records() -> list[str]:
    """The record names of the ML IOC's database, without the prefix."""
    db = resources.files("edgeloop.db").joinpath("ml.db").read_text()
    return re.findall(r'record\(\w+,\s*"\$\(P\)([^"]+)"\)', db)


def pva_names() -> list[str]:
    edge = [*scalars(EdgeConfig()), *EDGE_OTHERS]
    return [f"edge:{n}" for n in edge] + ml_records()


def pva_row(name: str, value) -> tuple:
    if isinstance(value, Exception):
        return name, "", "", "", "no"
    fields = value.keys()
    v = value["value"] if "value" in fields else ""
    if "dimension" in fields:  # NTNDArray
        dims = "x".join(str(d["size"]) for d in value["dimension"])
        v = f"image {dims} uniqueId {value['uniqueId']}"
    elif "labels" in fields:  # NTTable
        first = value["value"][value["labels"][0]] if len(value["labels"]) else None
        v = f"table {0 if first is None else len(first)} rows"
    elif hasattr(v, "keys") and "choices" in v.keys():  # NTEnum
        v = v["choices"][v["index"]] if 0 <= v["index"] < len(v["choices"]) else v["index"]
    units = value.get("display.units", "") or ""
    severity = value.get("alarm.severity", 0) or 0
    precision = value.get("display.precision") if "display" in fields else None
    return name, _fmt(v, precision), units, SEVERITIES[min(severity, 3)], "yes"


def ca_rows(names: list[str], timeout: float) -> list[tuple]:
    """The CA PVs, searched for side by side, each given what is left of ``timeout``."""
    from caproto.threading.client import Context as CAContext

    ctx = CAContext()
    try:
        deadline = time.monotonic() + timeout
        rows = []
        for pv in ctx.get_pvs(*names, timeout=timeout):
            try:
                left = max(deadline - time.monotonic(), 0.05)
                rows.append(_ca_row(pv.name, pv.read(data_type="control", timeout=left)))
            except Exception:
                rows.append((pv.name, "", "", "", "no"))
        return rows
    finally:
        ctx.disconnect()


def _ca_row(name: str, response) -> tuple:
    meta, data = response.metadata, response.data
    strings = getattr(meta, "enum_strings", None)
    if strings:
        value = strings[int(data[0])].decode()
    elif getattr(data, "dtype", None) is not None and data.dtype.itemsize == 1 and len(data) > 1:
        value = bytes(data.astype("u1")).split(b"\0")[0].decode(errors="replace")
    else:
        value = data[0].decode() if isinstance(data[0], bytes) else data[0]
    units = getattr(meta, "units", b"").decode()
    precision = getattr(meta, "precision", None)
    return name, _fmt(value, precision), units, SEVERITIES[min(int(meta.severity), 3)], "yes"


def _fmt(value, precision: int | None = None) -> str:
    """A value as a display shows it: floats with the PV's precision."""
    if isinstance(value, float | np.floating):
        text = f"{value:.{precision}f}" if precision is not None else f"{value:.6g}"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def status(prefix: str, beamline: bool = False, timeout: float = 3.0) -> tuple[list, list]:
    """(rows, names that did not answer)."""
    names = [f"{prefix}{n}" for n in pva_names()]
    with Context("pva", nt=False) as ctx:
        values = ctx.get(names, timeout=timeout, throw=False)
    rows = [pva_row(n, v) for n, v in zip(names, values)]
    if beamline:
        rows += ca_rows([f"{prefix}{n}" for n in BEAMLINE_CA], timeout)
    missing = [row[0] for row in rows if row[4] == "no"]
    return rows, missing


def print_status(prefix: str, beamline: bool = False, timeout: float = 3.0) -> int:
    """Print the table; 0 when every PV answered, else 1 with the names that did not."""
    rows, missing = status(prefix, beamline, timeout)
    header = ("PV", "value", "units", "severity", "connected")
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(5)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    if missing:
        hint = search_hint("pva") + "; " + search_hint("ca") if beamline else search_hint("pva")
        print(f"\n{len(missing)} PV(s) did not answer within {timeout} s ({hint}):")
        for name in missing:
            print(f"  {name}")
        return 1
    return 0
