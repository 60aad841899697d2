"""`capfast features`: a frozen trunk run once over a split, its features stored for training from the cache."""
