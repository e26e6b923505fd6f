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


def validate(run: FinishedRun, valid_keys: set[tuple[tuple[str, ...], ...]] | None = None) -> None:
    """Raise MLflow's own ``MlflowException`` (``INVALID_PARAMETER_VALUE``) for a run the
    public ``log_batch`` would reject (illegal key, too long a value, over the batch limits).

    ``valid_keys``: the key sets (metric, param and tag keys) of runs already found valid,
    kept by the caller. MLflow's checks of a run's keys and counts depend on the keys
    alone, and its checks of the values are the few below; a run whose keys were already
    found valid and whose values pass those is valid without MLflow's per-key checks (a
    trial's child run has the keys of the trials before it: ~1 ms of CPU per run saved)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.validation import (
        MAX_PARAM_VAL_LENGTH,
        MAX_TAG_VAL_LENGTH,
        _is_numeric,
        _validate_batch_log_data,
        _validate_batch_log_limits,
    )

    keys = (tuple(run.metrics), tuple(run.params), tuple(run.tags))
    if (valid_keys is not None and keys in valid_keys and run.end_ms >= 0
            and all(_is_numeric(v) for v in run.metrics.values())
            and all(len(v) <= MAX_PARAM_VAL_LENGTH for v in run.params.values())
            and all(len(v) <= MAX_TAG_VAL_LENGTH for v in run.tags.values())):
        return
    metrics = [Metric(k, v, run.end_ms, 0) for k, v in run.metrics.items()]
    params = [Param(k, v) for k, v in run.params.items()]
    tags = [RunTag(k, v) for k, v in run.tags.items()]
    _validate_batch_log_data(metrics, params, tags)
    _validate_batch_log_limits(metrics, params, tags)
    if valid_keys is not None:
        valid_keys.add(keys)


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
    tag_rows: list[tuple[Any, ...]] = []  # in the column order of _insert_rows
    param_rows: list[tuple[Any, ...]] = []
    metric_rows: list[tuple[Any, ...]] = []
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
            tag_rows += [(k, v, run_id) for k, v in tags.items()]
            param_rows += [(k, v, run_id) for k, v in r.params.items()]
            for k, v in r.metrics.items():
                is_nan, value = store.sanitize_metric_value(float(v))
                metric_rows.append((k, value, r.end_ms, 0, is_nan, run_id))
        session.execute(insert(SqlRun.__table__), run_rows)
        for table, rows in ((SqlTag, tag_rows), (SqlParam, param_rows), (SqlMetric, metric_rows),
                            (SqlLatestMetric, metric_rows)):
            if rows:
                _insert_rows(session, table.__table__, rows)
    return ids


#: the columns of the rows :func:`insert_finished_runs` builds, per table
_COLUMNS = {
    "tags": ("key", "value", "run_uuid"), "params": ("key", "value", "run_uuid"),
    "metrics": ("key", "value", "timestamp", "step", "is_nan", "run_uuid"),
    "latest_metrics": ("key", "value", "timestamp", "step", "is_nan", "run_uuid"),
}


def _insert_rows(session: Any, table: Any, rows: list[tuple[Any, ...]]) -> None:
    """One ``INSERT`` of ``rows`` (tuples in the order of :data:`_COLUMNS`, which must be
    every column of ``table``) in the session's transaction, straight to the SQLite
    driver's ``executemany``: SQLAlchemy's ``insert()`` rebuilt each row's parameters (a
    third of the CPU of a batch of child runs with a dozen params and metrics each), for
    values the driver stores as they are (str, int, float; a bool as 0/1, as SQLAlchemy's
    Boolean does)."""
    cols = _COLUMNS[table.name]
    if sorted(cols) != sorted(c.name for c in table.columns):
        raise ValueError(f"MLflow's table {table.name} has columns {[c.name for c in table.columns]}, not {cols}")
    names = ", ".join(f'"{c}"' for c in cols)
    session.connection().exec_driver_sql(
        f'INSERT INTO "{table.name}" ({names}) VALUES ({", ".join("?" * len(cols))})', rows)
