"""Tracking: MLflow runs per study and trial, Parquet tables and Pareto plots.

Never imports ``dse``: a study arrives as a :class:`StudyInfo` (plain data + the study's
rules as callables), built by ``dse.spec.study_info``.
"""

from tracking.info import ObjectiveInfo, ParamInfo, StudyInfo, default_uri, resolve_uri

__all__ = ["ObjectiveInfo", "ParamInfo", "StudyInfo", "default_uri", "resolve_uri"]
