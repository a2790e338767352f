"""Audit: offline verification of a package, its self-test, the rebuild that reproduces it, and trace."""
