"""Image sources and the on-disk activation store."""
