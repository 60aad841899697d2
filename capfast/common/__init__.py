"""Plumbing that knows nothing of captions: atomic files, config options, progress, devices, DDP."""
