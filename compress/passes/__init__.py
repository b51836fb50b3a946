"""Compression passes, one per file; each registers itself in compress.registry on import."""
