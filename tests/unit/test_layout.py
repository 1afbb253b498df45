"""The folder tree is the import tree: every ``edgeloop.*`` module the sources import resolves
through plain path search (what editors and static analysers do), with no import hook."""

import ast
import sys
from importlib.machinery import PathFinder
from pathlib import Path

import edgeloop

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("edgeloop", "app", "ioc", "edge_pva", "remote", "bluesky_plans", "tests", "benchmarks")


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n == "edgeloop" or n.startswith("edgeloop.")}


def _resolve(name: str) -> Path | None:
    """The file of a module or package found by path search alone (sys.path as the
    environment's .pth files leave it), or None; ``from m import attr`` gives None for attr."""
    search, spec = None, None
    for part in name.split("."):
        spec = PathFinder.find_spec(part, search)
        if spec is None or spec.origin is None:
            return None
        search = spec.submodule_search_locations
    return Path(spec.origin)


def test_every_edgeloop_import_resolves_by_path_search_alone():
    assert not [f for f in sys.meta_path if "editable" in type(f).__module__.lower()]
    assert Path(edgeloop.__file__).resolve() == ROOT / "edgeloop" / "__init__.py"
    missing = {}
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            for name in _imported(path):
                parent = name.rpartition(".")[0]
                if _resolve(name) is None and _resolve(parent) is None:
                    missing.setdefault(name, str(path.relative_to(ROOT)))
    assert missing == {}


def test_each_part_is_its_folder():
    for part in ("app", "ioc", "edge_pva", "remote", "bluesky_plans", "db"):
        link = ROOT / "edgeloop" / part
        assert link.is_symlink() and link.resolve() == ROOT / part
        assert _resolve(f"edgeloop.{part}").resolve() == ROOT / part / "__init__.py"
