"""normlab.analysis (filled in by its issue)."""
