"""Finished MLflow runs written in bulk into MLflow's own SQL store, one transaction per batch.

MLflow's client logs a finished run in three calls (``create_run``, ``log_batch``,
``set_terminated``); against its SQLAlchemy store those are 14 ORM sessions and about 40
SQL statements, 20-60 ms of Python per run on the 2-core machine (docs/benchmarks.md), more
than an instant trial costs the search. :func:`insert_finished_runs` writes the same rows
(``runs``, ``tags``, ``params``, ``metrics``, ``latest_metrics``) for a whole batch of runs
with one ``INSERT ... VALUES`` per table, through MLflow's store (its session maker, which
sets its SQLite pragmas, and its table models), in one transaction: all of a batch or none
of it is in the store, so a killed process never leaves a run half-logged.

It depends on the layout of MLflow's tables, so it is used only with the MLflow version it
was written and tested against (:data:`MLFLOW_VERSION`, the pinned one) and only for a
SQLite store; anything else goes through MLflow's public client
(:func:`bulk_store` returns ``None``). ``tests/test_tracking.py`` checks that runs written
here read back through ``MlflowClient`` exactly as the public API's do.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: The MLflow version whose table layout :func:`insert_finished_runs` writes (pyproject pin).
MLFLOW_VERSION = "3.17.2"


@dataclass(frozen=True)
class FinishedRun:
    """One finished run: its name, start and end (ms since the epoch), tags, params and
    metrics (key -> value, each logged once at ``end_ms`` with step 0)."""

    name: str
    start_ms: int
    end_ms: int
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]


def bulk_store(client: Any) -> Any | None:
    """The SQLAlchemy store behind ``client`` (an ``MlflowClient``) when
    :func:`insert_finished_runs` may write into it (MLflow :data:`MLFLOW_VERSION`, SQLite
    backend); ``None`` otherwise (use the public API)."""
    import mlflow
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    if mlflow.__version__ != MLFLOW_VERSION:
        return None
    store = client._tracking_client.store
    if not isinstance(store, SqlAlchemyStore) or store.db_type != "sqlite":
        return None
    return store


def validate(run: FinishedRun) -> None:
    """Raise MLflow's own ``MlflowException`` (``INVALID_PARAMETER_VALUE``) for a run the
    public ``log_batch`` would reject (illegal key, too long a value, over the batch limits)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.validation import _validate_batch_log_data, _validate_batch_log_limits

    metrics = [Metric(k, v, run.end_ms, 0) for k, v in run.metrics.items()]
    params = [Param(k, v) for k, v in run.params.items()]
    tags = [RunTag(k, v) for k, v in run.tags.items()]
    _validate_batch_log_data(metrics, params, tags)
    _validate_batch_log_limits(metrics, params, tags)


def insert_finished_runs(store: Any, experiment_id: str, runs: Sequence[FinishedRun]) -> list[str]:
    """Write ``runs`` (already :func:`validate`-d) as FINISHED runs of ``experiment_id`` in
    one transaction of ``store`` (from :func:`bulk_store`); returns their run ids, in order.

    The rows are those MLflow's ``create_run`` + ``log_batch`` + ``set_terminated`` write:
    the run (source ``UNKNOWN``, user ``unknown``, artifact URI under the experiment's
    artifact location), its tags plus ``mlflow.runName``, params, each metric in the history
    and as the latest value (NaN stored as 0 with ``is_nan``, +-inf as +-max float). Raises
    ``MlflowException`` when the experiment is not active, and SQLAlchemy's errors on a
    database failure (nothing of the batch is written then).
    """
    from mlflow.entities.lifecycle_stage import LifecycleStage
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
    from mlflow.store.tracking.dbmodels.models import (
        SqlExperiment,
        SqlLatestMetric,
        SqlMetric,
        SqlParam,
        SqlRun,
        SqlTag,
    )
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
    from mlflow.utils.uri import append_to_uri_path
    from sqlalchemy import insert

    if not runs:
        return []
    run_rows: list[dict[str, Any]] = []
    tag_rows: list[dict[str, Any]] = []
    param_rows: list[dict[str, Any]] = []
    metric_rows: list[dict[str, Any]] = []
    with store.ManagedSessionMaker(read_only=False) as session:
        exp = session.query(SqlExperiment).filter(SqlExperiment.experiment_id == int(experiment_id)).one()
        if exp.lifecycle_stage != LifecycleStage.ACTIVE:
            raise MlflowException(
                f"The experiment {experiment_id} must be in the 'active' state. "
                f"Current state is {exp.lifecycle_stage}.",
                INVALID_PARAMETER_VALUE,
            )
        ids = []
        for r in runs:
            run_id = uuid.uuid4().hex
            ids.append(run_id)
            run_rows.append({
                "run_uuid": run_id, "name": r.name, "source_type": "UNKNOWN", "source_name": "",
                "entry_point_name": "", "user_id": "unknown", "status": "FINISHED",
                "start_time": r.start_ms, "end_time": r.end_ms, "deleted_time": None,
                "source_version": "", "lifecycle_stage": LifecycleStage.ACTIVE,
                "artifact_uri": append_to_uri_path(exp.artifact_location, run_id, "artifacts"),
                "experiment_id": exp.experiment_id,
            })
            tags = {**r.tags, MLFLOW_RUN_NAME: r.name}
            tag_rows += [{"run_uuid": run_id, "key": k, "value": v} for k, v in tags.items()]
            param_rows += [{"run_uuid": run_id, "key": k, "value": v} for k, v in r.params.items()]
            for k, v in r.metrics.items():
                is_nan, value = store.sanitize_metric_value(float(v))
                metric_rows.append({"run_uuid": run_id, "key": k, "value": value, "timestamp": r.end_ms,
                                    "step": 0, "is_nan": is_nan})
        session.execute(insert(SqlRun.__table__), run_rows)
        for table, rows in ((SqlTag, tag_rows), (SqlParam, param_rows), (SqlMetric, metric_rows),
                            (SqlLatestMetric, metric_rows)):
            if rows:
                session.execute(insert(table.__table__), rows)
    return ids
