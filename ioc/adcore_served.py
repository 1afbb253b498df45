"""The rest of ADCore's records: for each plugin of the simulated detector, every record of
the committed ADCore table (``edgeloop.ioc.adcore_db``) that the simulation's own groups do not
define, served with ADCore's name, type, element count and enum strings.  A setpoint the
simulation does not act on is taken and shown on its ``_RBV``, as an asyn driver that stores a
parameter it does not use; a readback only changes when the simulation writes it."""

from __future__ import annotations

from caproto import ChannelType
from caproto.server import PVGroup, pvproperty

from edgeloop.ioc.adcore_db import load_table
from edgeloop.ioc.areadetector import CharWaveform


def _initial(view: dict):
    raw, kind = view.get("value", ""), view["type"]
    if kind == "ENUM":
        strings = view["enum_strings"]
        index = int(raw) if raw.strip().lstrip("-").isdigit() else 0
        return strings[index] if 0 <= index < len(strings) else strings[0]
    if kind in ("LONG", "INT"):
        return int(raw) if raw.strip().lstrip("-").isdigit() else 0
    if kind in ("DOUBLE", "FLOAT"):
        try:
            return float(raw)
        except ValueError:
            return 0.0
    if kind == "STRING":
        return raw[:39]
    if kind == "CHAR":
        return raw
    return [0] * view["count"]


async def _echo_to_readback(group, instance, value):
    """A setpoint's value is shown on its ``_RBV``, wherever in the beamline that record is."""
    readback = group.served.get(instance.pvname + "_RBV")
    if readback is not None and readback is not instance:
        await readback.write(value)
    return value


def _property(name: str, view: dict) -> pvproperty:
    kind = view["type"]
    kwargs: dict = {"name": name, "dtype": ChannelType[kind], "value": _initial(view)}
    if kind == "ENUM":
        kwargs["enum_strings"] = view["enum_strings"]
    elif kind == "CHAR":
        kwargs["max_length"] = view["count"]
        if view["writable"]:
            kwargs["dtype"] = CharWaveform
    elif kind in ("DOUBLE", "FLOAT"):
        kwargs.update(precision=view.get("precision", 0), units=view.get("units", ""))
    elif view["count"] > 1:
        kwargs["max_length"] = view["count"]
    if view["writable"]:
        kwargs["put"] = _echo_to_readback
    else:
        kwargs["read_only"] = True
    return pvproperty(**kwargs)


def missing_records(plugin: str, served: dict, prefix: str) -> PVGroup:
    """A group serving the records of ``plugin`` (``"cam1:"``, ``"HDF1:"``, ...) in ADCore's
    table that ``served`` (the beamline's pvdb so far) lacks under ``prefix``."""
    attrs = {
        f"r{i}": _property(name, view)
        for i, (name, view) in enumerate(load_table()[plugin].items())
        if prefix + name not in served
    }
    group_class = type(f"ADCore_{plugin.rstrip(':')}", (PVGroup,), attrs)
    group_class.from_adcore_table = True
    group = group_class(prefix)
    group.served = served
    return group
