"""edgeloop: close the loop between an X-ray experiment and machine learning.

The top-level folders of the repository are import packages under this namespace:
``ioc/`` is ``edgeloop.ioc``, ``edge_pva/`` is ``edgeloop.edge_pva``, ``remote/`` is
``edgeloop.remote``, ``bluesky_plans/`` is ``edgeloop.bluesky_plans``.  The modules here
(configuration, network definitions, NTNDArray helpers, model registry) are the one
shared module set those packages may import.
"""

__version__ = "0.1.0"
