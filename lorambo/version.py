"""The lorambo version, in a module of its own so that every floor can read it (docs/architecture.md)."""

__version__ = "0.1.0"
