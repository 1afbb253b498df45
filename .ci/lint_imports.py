"""Check the import contract (setup.cfg [importlinter]) on the package as it is installed.

setup.cfg maps the design card's folders into the ``edgeloop`` namespace with package_dir
(``ioc/`` is ``edgeloop.ioc``); an editable install resolves that mapping with an import
hook, but import-linter finds modules by walking the root package's directory.  So the
mapping is laid out as files under build/import-graph (the .py files only) and the linter
runs on that copy."""

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "import-graph"


def main() -> int:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    mapping = dict(
        line.split("=") for line in setup["options"]["package_dir"].strip().splitlines()
    )
    shutil.rmtree(TREE, ignore_errors=True)
    for package, folder in mapping.items():
        source = ROOT / folder.strip()
        for path in source.rglob("*.py"):
            target = TREE.joinpath(*package.strip().split("."), path.relative_to(source))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    env = dict(os.environ, PYTHONPATH=str(TREE))
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.call(
        [str(lint), "--config", str(ROOT / "setup.cfg"), "--no-cache"], env=env, cwd=TREE
    )


if __name__ == "__main__":
    sys.exit(main())
