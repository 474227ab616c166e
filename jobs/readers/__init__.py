"""Readers that turn landed files into bronze rows and quarantine rows."""
