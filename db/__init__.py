"""EPICS database and access-security files, shipped as package data (edgeloop.db); no
Python, so in no layer: the ML IOC launcher (``edgeloop.ioc.softioc``) loads them."""
