"""normlab.train (filled in by its issue)."""
