"""Tracking: MLflow runs per study and trial, Parquet tables and Pareto plots.

Never imports ``dse``: a study arrives as a :class:`StudyInfo` (plain data + the study's
rules as callables), built by ``dse.spec.study_info``.
"""

import os

from tracking.info import (
    ObjectiveInfo,
    ParamInfo,
    StudyInfo,
    default_uri,
    resolve_uri,
    telemetry_off,
)

# MLflow 3 sends usage telemetry from every process that imports it (a thread started by
# ``import mlflow``) unless told not to. dse's processes reach MLflow only through this
# package (the logging process, ``dse sync``, ``dse ui``'s server, which inherit this
# environment), so it is switched off here, before any MLflow import, unless the user chose.
telemetry_off(os.environ)

__all__ = ["ObjectiveInfo", "ParamInfo", "StudyInfo", "default_uri", "resolve_uri"]
