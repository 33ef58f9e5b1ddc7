"""normlab.models (filled in by its issue)."""
