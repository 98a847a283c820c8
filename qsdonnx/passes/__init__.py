"""Pipeline passes: one family per module."""
