"""The converted data directory: what `capfast convert` writes and every reader reads."""
