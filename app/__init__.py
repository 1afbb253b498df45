"""The apps layer: the ``edgeloop`` command line, the demos, the HEDM accuracy experiment
and process supervision.  Only code here may import several of the parts (``ioc``,
``edge_pva``, ``remote``, ``bluesky_plans``); nothing imports it."""
