"""Executors for the retraining steps: any ``concurrent.futures.Executor`` works; names in
configuration map to one here."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor


def local_executor() -> Executor:
    # spawn: a fresh interpreter, no inherited server threads or sockets
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


EXECUTORS = {"local": local_executor}


def make_executor(name: str) -> Executor:
    try:
        return EXECUTORS[name]()
    except KeyError:
        raise ValueError(f"unknown executor {name!r}; available: {sorted(EXECUTORS)}") from None
