"""edgeloop: close the loop between an X-ray experiment and machine learning.

The top-level folders of the repository are import packages under this namespace, in three
layers:

- the core: the modules of this package itself (configuration, network definitions, model
  registry, NTNDArray helpers, scan file format, optics, the peak finder, logging); they
  import none of the parts;
- the parts: ``ioc/`` is ``edgeloop.ioc``, ``edge_pva/`` is ``edgeloop.edge_pva``,
  ``remote/`` is ``edgeloop.remote``, ``bluesky_plans/`` is ``edgeloop.bluesky_plans``; each
  imports only the core;
- the apps: ``edgeloop.app`` (CLI, demos, experiments, process supervision), the only code
  that imports several parts.

The import contract in setup.cfg (``make lint``) holds this.
"""

__version__ = "0.1.0"
