"""Edge server: PVA monitor in, batched inference, PVA server out, model hot swap.

A part: it imports only the core (``edgeloop``'s own modules), never another part.
"""
