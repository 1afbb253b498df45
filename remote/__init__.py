"""Retraining: data staging, label making (phase retrieval, pseudo-Voigt fits), training,
executors, and the service that runs it all when $(P)ml:Retrain is written.

A part: it imports only the core (``edgeloop``'s own modules), never another part.
"""
