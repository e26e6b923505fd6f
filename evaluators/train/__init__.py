"""Seeded, deterministic training scripts for the shipped models (run on purpose)."""
