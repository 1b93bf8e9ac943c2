"""The box's kernel concerns, one module each (filled in below)."""
