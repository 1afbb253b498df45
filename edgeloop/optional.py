"""Optional dependencies (core): imported where they are used, with an install hint when
missing.  The extras are declared in setup.cfg."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``, or raise ImportError saying which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is not installed; it comes with pip install 'edgeloop[{extra}]'"
        ) from exc
