"""The operator screens: the committed .bob files are what the generator writes, every
widget and property is one Phoebus knows, every PV a screen names answers on a running loop
through real CA and PVA clients, and the overview draws from the live PVs."""

from pathlib import Path

import pytest

from edgeloop.app import screens

SCREENS = Path(__file__).resolve().parents[2] / "screens"


@pytest.mark.parametrize("name", screens.SCREENS)
def test_committed_screens_are_generated_and_known_to_phoebus(name, tmp_path):
    screens.write(tmp_path)
    committed = SCREENS / f"{name}.bob"
    assert committed.read_text() == (tmp_path / f"{name}.bob").read_text(), (
        "screens/ is stale: run `edgeloop screens`"
    )
    assert screens.unknown_properties(committed) == []
    assert (SCREENS / "phoebus_settings.ini").read_text() == screens.SETTINGS


def test_a_property_phoebus_does_not_know_is_found(tmp_path):
    bad = tmp_path / "bad.bob"
    text = (SCREENS / "overview.bob").read_text()
    text = text.replace("<show_units>true</show_units>", "<show_unitz>true</show_unitz>", 1)
    bad.write_text(text.replace('type="image"', 'type="imag"', 1))
    problems = screens.unknown_properties(bad)
    assert "textupdate.show_unitz" in problems and "widget type 'imag'" in problems


@pytest.mark.parametrize("path", sorted(SCREENS.glob("*.bob")), ids=lambda p: p.name)
def test_no_two_widgets_overlap_and_all_lie_inside_the_display(path):
    assert screens.layout_problems(path) == []


def test_the_generator_refuses_an_overlap_and_the_check_finds_one(tmp_path):
    lay = screens._Layout("t", 400, 300)
    lay.label("a", 10, 50)
    with pytest.raises(ValueError, match="overlaps label"):
        lay.label("b", 100, 60)
    with pytest.raises(ValueError, match="outside"):
        lay.label("c", 300, 50)
    bad = tmp_path / "bad.bob"
    text = (SCREENS / "overview.bob").read_text()
    bad.write_text(text.replace("<x>870</x>", "<x>20</x>", 1))
    assert any("overlaps" in problem for problem in screens.layout_problems(bad))
