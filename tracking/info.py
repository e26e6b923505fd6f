"""What tracking is told about a study: plain data, built by ``dse`` from its spec.

``tracking/`` never imports ``dse`` (the arrow points one way: ``dse`` -> ``tracking``).
The driver and the CLI build one :class:`StudyInfo` per study (``dse.spec.study_info``)
and hand it over. The study's rules that tracking applies but does not own (which fixed
parameters a trial has, which trials are feasible and on the Pareto front, the
hypervolume) arrive as callables; they must be picklable (module-level functions or
``functools.partial`` of them), because the logging runs in a spawned process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial

#: trial user attribute marking a spec ``enqueue`` point (a baseline), set by the driver
BASELINE_ATTR = "dse:baseline"

#: the switches of MLflow 3's usage telemetry (``mlflow.telemetry.utils.is_telemetry_disabled``)
TELEMETRY_SWITCHES = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")


def telemetry_off(environ: MutableMapping[str, str]) -> None:
    """Turn MLflow's usage telemetry off in ``environ`` (``MLFLOW_DISABLE_TELEMETRY=true``)
    unless the user set one of its switches (:data:`TELEMETRY_SWITCHES`) themselves."""
    if not any(k in environ for k in TELEMETRY_SWITCHES):
        environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


@dataclass(frozen=True)
class ObjectiveInfo:
    """One objective: the metric, ``"minimize"``/``"maximize"``, hypervolume reference
    (in the metric's own units; ``None`` when the spec gives none)."""

    metric: str
    direction: str
    ref: float | None = None


@dataclass(frozen=True)
class ParamInfo:
    """One search-space parameter: its dotted name and its domain in words
    (``"int [1, 4] step 1"``, ``"choices ['a', 'b']"``, ``"fixed 3"``, with ``when ...``)."""

    name: str
    domain: str


@dataclass(frozen=True)
class StudyInfo:
    """Everything tracking needs to know about one study.

    Attributes:
        name: the study (and MLflow experiment) name.
        description: one paragraph for the MLflow experiment page.
        objectives: in the order of a trial's ``values``.
        constraint_keys: the Optuna constraint keys (violation <= 0 is feasible).
        params: the search space in space order, fixed parameters included.
        sampler, sampler_options, seed, n_trials: the search settings (shown as params).
        evaluators: evaluator names.
        child_runs: ``"all"`` (a child run per COMPLETE trial) or ``"pareto"``.
        artifact_every: write tables/plots after this many newly COMPLETE trials.
        uri: the MLflow tracking URI to use, already resolved (:func:`resolve_uri`).
        spec_text: the spec's TOML text (a tag of the parent run).
        storage_desc: where the Optuna storage lives (a tag of the parent run).
        study_uid: the study's identity (tag ``dse.study_uid`` of its runs); a parent run
            with another identity belongs to an earlier study of the same name and is
            never adopted. ``""``: adopt the experiment's parent run.
        complete_params: a trial's sampled params -> all its active params, fixed included.
        is_feasible: whether a COMPLETE trial satisfies every constraint.
        front: the feasible COMPLETE trials on the Pareto front, in trial order.
        hypervolume: hypervolume of the feasible front of some trials (0.0 for none).
    """

    name: str
    objectives: tuple[ObjectiveInfo, ...]
    params: tuple[ParamInfo, ...]
    complete_params: Callable[[Mapping[str, Any]], dict[str, Any]]
    is_feasible: Callable[[FrozenTrial], bool]
    front: Callable[[Sequence[FrozenTrial]], list[FrozenTrial]]
    hypervolume: Callable[[Sequence[FrozenTrial]], float]
    uri: str
    description: str = ""
    constraint_keys: tuple[str, ...] = ()
    sampler: str = ""
    sampler_options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    n_trials: int = 0
    evaluators: tuple[str, ...] = ()
    child_runs: str = "all"
    artifact_every: int = 50
    spec_text: str = ""
    storage_desc: str = ""
    study_uid: str = ""

    @property
    def param_names(self) -> list[str]:
        """Parameter names in space order."""
        return [p.name for p in self.params]


def default_uri(sdir: Path) -> str:
    """The default MLflow tracking URI of a study: ``sqlite:///<sdir>/mlflow.db``."""
    return f"sqlite:///{(Path(sdir) / 'mlflow.db').resolve()}"


def resolve_uri(explicit: str | None, sdir: Path) -> str:
    """The tracking URI: ``explicit`` (``--tracking-uri``, else the spec's ``[tracking] uri``)
    > the ``MLFLOW_TRACKING_URI`` environment variable > the study's SQLite file."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(sdir)
