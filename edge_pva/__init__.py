"""Edge server: PVA monitor in, batched inference, PVA server out, model hot swap."""
