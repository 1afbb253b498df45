"""The simulated detector against the real one: the real simDetector IOC of
``../shared/adsim`` (ADSimDetector on ADCore) serves every record of the committed ADCore
table with the table's type, count and enum strings, and the simulation serves each of them
the same way."""

import pytest

from edgeloop.ioc.adcore_db import load_table
from tests.kit.areadetector import beamline_ioc
from tests.kit.env import ca_port, random_prefix
from tests.kit.real_ad import real_sim_detector, served_records


def expected(prefix: str) -> dict[str, dict]:
    """The table's view of each record, as served_records reports it."""
    want = {}
    for plugin, records in load_table().items():
        for name, view in records.items():
            kind = {"DOUBLE": "DOUBLE", "LONG": "LONG", "ENUM": "ENUM", "STRING": "STRING",
                    "CHAR": "CHAR", "INT": "INT", "FLOAT": "FLOAT"}[view["type"]]  # fmt: skip
            row = {"type": kind, "count": view["count"]}
            if kind == "ENUM":
                row["enum_strings"] = view["enum_strings"]
            want[f"{prefix}{plugin}{name}"] = row
    return want


def differences(want: dict, seen: dict) -> list[str]:
    return [
        f"{name}: {seen.get(name, 'not served')} != {view}"
        for name, view in want.items()
        if seen.get(name) != view
    ]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    with real_sim_detector(tmp_path_factory.mktemp("real"), random_prefix("r") + "det:") as ioc:
        yield ioc


def test_the_real_ioc_serves_the_committed_table(real):
    want = expected(real.prefix)
    assert differences(want, served_records(list(want))) == []


def test_the_simulation_serves_each_record_as_the_real_ioc_does(real, tmp_path, request):
    real_view = served_records(list(expected(real.prefix)))
    with beamline_ioc(tmp_path, ca_port("area_detector_own"), request) as sim:
        sim_prefix = f"{sim.prefix}det:"
        want = {name.replace(real.prefix, sim_prefix, 1): v for name, v in real_view.items()}
        assert differences(want, served_records(list(want))) == []
