"""EPICS database and access-security files, shipped as package data (edgeloop.db)."""
