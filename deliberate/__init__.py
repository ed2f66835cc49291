"""Deliberate: CLI and settings that wire the server, the worker and the store."""
