"""Adapters that wrap the plain libraries as registered evaluators (see dse.registry)."""
