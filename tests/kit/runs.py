"""A real bluesky RunEngine for the tests: ``run_engine()`` (its loop thread stopped after),
``run_plan(plan)`` (the documents, each checked against its schema), ``of(docs, kind)``."""

import contextlib
from pathlib import Path
from urllib.parse import urlparse


@contextlib.contextmanager
def run_engine():
    """A bluesky RunEngine whose event-loop thread is stopped afterwards."""
    from bluesky import RunEngine

    engine = RunEngine({})
    try:
        yield engine
    finally:
        if engine.state != "idle":
            engine.halt()
        # Each RunEngine runs its own event loop on a daemon thread: stop it and close it.
        loop, thread = engine.loop, getattr(engine, "_th", None)
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=5)
            if not loop.is_running():
                loop.close()


def run_plan(plan, docs: list | None = None, engine=None) -> list[tuple[str, dict]]:
    """Run ``plan`` on a real RunEngine (``engine``, or a new one stopped after: ophyd-async
    devices need the engine whose loop they connected in); its documents (into ``docs`` when
    given, so they are kept when the plan raises), each checked against its schema."""
    from event_model import DocumentNames, schema_validators

    docs = [] if docs is None else docs
    with contextlib.nullcontext(engine) if engine else run_engine() as RE:
        token = RE.subscribe(lambda name, doc: docs.append((name, doc)))
        try:
            RE(plan)
        finally:
            RE.unsubscribe(token)
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    return docs


def filed_frames(docs, *datasets: str) -> tuple:
    """The file a run's one ``stream_resource`` names, and what its ``stream_datum`` indices
    cover there: the resource's dataset (the frames), then each of ``datasets``."""
    import h5py

    (resource,) = of(docs, "stream_resource")
    path = Path(urlparse(resource["uri"]).path)
    indices = [i for d in of(docs, "stream_datum") for i in range(*d["indices"].values())]
    with h5py.File(path, "r", swmr=True) as f:
        names = (resource["parameters"]["dataset"], *datasets)
        return (path, *(f[name][indices] for name in names))


def of(docs, kind: str) -> list[dict]:
    """The documents of one kind."""
    return [doc for name, doc in docs if name == kind]
