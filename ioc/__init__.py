"""Simulated beamline: stage motors and detector (caproto CA + p4p PVA), the physics
simulators, and the launcher of the real EPICS IOC that loads ``db/``.

A part: it imports only the core (``edgeloop``'s own modules), never another part.
"""
