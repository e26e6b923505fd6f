"""Tracking: MLflow runs per study and trial, Parquet tables and Pareto plots."""
