"""Frames in over pvAccess: ``post`` (a frame on a p4p SharedPV).  The answers out are
collected with edgeloop.app.answers, as the demos and the benchmarks collect them."""


def post(source, value):
    """Post a frame on a SharedPV, opening it with the first."""
    if source.isOpen():
        source.post(value)
    else:
        source.open(value)
