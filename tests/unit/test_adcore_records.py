"""The simulated detector's records against ADCore's: the committed table is what ADCore's
templates (the ones the real simDetector IOC loaded) define, the simulation serves every
record of it with the same type, element count, enum strings and access, and a setpoint the
simulation does not act on shows on its readback."""

import asyncio

import numpy as np
import pytest
from caproto import ChannelType
from p4p.server.thread import SharedPV

from edgeloop.config import Config
from edgeloop.ioc import adcore_db
from edgeloop.ioc.beamline import Beamline
from tests.kit.env import ADCORE_DB

PREFIX = "T:"


@pytest.fixture(scope="module")
def beamline():
    return Beamline(PREFIX, Config(), SharedPV())


def served(beamline, plugin: str, name: str):
    return beamline.pvdb[f"{PREFIX}det:{plugin}{name}"]


def test_the_committed_table_is_what_adcores_templates_define():
    assert adcore_db.table(ADCORE_DB) == adcore_db.load_table(), (
        "ioc/adcore_records.json is stale: regenerate it (see edgeloop.ioc.adcore_db)"
    )
    counts = {plugin: len(records) for plugin, records in adcore_db.load_table().items()}
    assert counts["HDF1:"] > 300 and counts["cam1:"] > 150 and counts["Codec1:"] > 150


def test_the_simulation_serves_every_record_with_adcores_type_and_choices(beamline):
    wrong = []
    for plugin, records in adcore_db.load_table().items():
        for name, view in records.items():
            pv = beamline.pvdb.get(f"{PREFIX}det:{plugin}{name}")
            if pv is None:
                wrong.append(f"{plugin}{name}: not served")
                continue
            if pv.data_type.name != view["type"]:
                wrong.append(f"{plugin}{name}: {pv.data_type.name}, ADCore {view['type']}")
            if view["type"] == "ENUM" and list(pv.enum_strings) != view["enum_strings"]:
                wrong.append(f"{plugin}{name}: {pv.enum_strings}, ADCore {view['enum_strings']}")
            if view["count"] > 1 and pv.max_length != view["count"]:
                wrong.append(f"{plugin}{name}: {pv.max_length} elements, ADCore {view['count']}")
            if name.endswith("_RBV") and pv.pvspec.read_only is not True:
                wrong.append(f"{plugin}{name}: a readback that takes a put")
    assert wrong == []


def test_a_setpoint_the_simulation_does_not_use_shows_on_its_readback(beamline):
    async def put_and_read():
        await served(beamline, "cam1:", "BinX").write(2)
        await served(beamline, "HDF1:", "NumExtraDims").write(1)
        return (
            served(beamline, "cam1:", "BinX_RBV").value,
            served(beamline, "HDF1:", "NumExtraDims_RBV").value,
        )

    assert asyncio.run(put_and_read()) == (2, 1)


def test_a_value_the_simulation_cannot_honour_is_refused(beamline):
    color = served(beamline, "cam1:", "ColorMode")
    with pytest.raises(ValueError, match="frames are Mono"):
        asyncio.run(color.write("RGB1"))
    asyncio.run(color.write("Mono"))
    assert served(beamline, "cam1:", "ColorMode_RBV").value == "Mono"


def test_an_empty_text_put_as_a_ca_client_sends_it_is_taken(beamline):
    async def put_nul(plugin: str, name: str):
        pv = served(beamline, plugin, name)
        await pv.write("something")
        await pv.write_from_dbr(np.zeros(1, np.uint8), ChannelType.CHAR, None)
        return pv.value, served(beamline, plugin, name + "_RBV").value

    assert asyncio.run(put_nul("HDF1:", "XMLFileName")) == ("", "")  # served from the table
    assert asyncio.run(put_nul("HDF1:", "FileName")) == ("", "")  # the file plugin's own


def test_a_compressor_the_simulation_cannot_apply_is_reported_and_frames_go_raw(beamline):
    codec = beamline.codec

    async def choose(name: str):
        await codec.enable.setpoint.write("Enable")
        await codec.compressor.setpoint.write(name)
        return codec.codec, codec.status.value, codec.error.value

    assert asyncio.run(choose("LZ4")) == ("lz4", "Success", "")
    chosen, status, error = asyncio.run(choose("JPEG"))
    assert (chosen, status) == ("", "Error") and "JPEG is not simulated" in error
    assert served(beamline, "Codec1:", "Compressor_RBV").value == "JPEG"


def test_a_template_that_does_not_parse_names_its_file(tmp_path):
    bad = tmp_path / "bad.template"
    bad.write_text('record(ao, "$(P)X")\n{\n  field(PREC "3")\n')
    with pytest.raises(adcore_db.TemplateError, match="bad.template"):
        adcore_db.parse(bad, {"P": "A:"})
    (tmp_path / "inc.template").write_text('include "missing.template"\n')
    with pytest.raises(adcore_db.TemplateError, match="missing.template"):
        adcore_db.parse(tmp_path / "inc.template", {})


def test_macros_take_their_defaults_and_a_later_definition_adds_fields(tmp_path):
    (tmp_path / "a.template").write_text(
        'record(longout, "$(P)$(R=cam1:)N") { field(VAL, "$(N=5)") }\ninclude "b.template"\n'
    )
    (tmp_path / "b.template").write_text('record(longout, "$(P)cam1:N") { field(DRVH, "9") }')
    (record,) = adcore_db.parse(tmp_path / "a.template", {"P": "X:"})
    assert record.name == "X:cam1:N" and record.fields == {"VAL": "5", "DRVH": "9"}
