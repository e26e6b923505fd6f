"""The Python API for notebooks: ``dse.run(spec)`` and ``dse.load(name)``.

Thin over the command line's machinery: :class:`dse.driver.Driver` runs a study exactly
as ``dse run`` does (same storage, resume, tracking), and :func:`load` opens a study as
``dse status``/``dse pareto`` do. Both return a :class:`StudyResult`::

    import dse
    res = dse.run("examples/zdt1.toml", n_trials=20, tracking=False)
    res.front              # the feasible Pareto-front trials (optuna FrozenTrial)
    res.study              # the optuna.Study
    res.table()            # every trial as a pyarrow Table (trials.parquet's columns)
    res = dse.load("zdt1", root="dse-studies")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dse.spec import Spec, load_spec, parse_spec

if TYPE_CHECKING:
    import optuna
    import pyarrow as pa
    from optuna.trial import FrozenTrial

    from dse.driver import RunSummary


@dataclass
class StudyResult:
    """A study and its spec, after :func:`run` or :func:`load`.

    Attributes:
        spec: the study's validated spec.
        study: the Optuna study (storage: ``<root>/<name>/``).
        study_dir: the study's directory.
        summary: what the run did (``None`` after :func:`load`).
    """

    spec: Spec
    study: optuna.Study
    study_dir: Path
    summary: RunSummary | None = None

    @property
    def front(self) -> list[FrozenTrial]:
        """Feasible COMPLETE trials on the Pareto front (ties kept), in trial order."""
        from dse.pareto import pareto_trials

        return pareto_trials(self.study.get_trials(deepcopy=False), self.spec)

    def table(self, front_only: bool = False) -> pa.Table:
        """Every trial (or only the front) as a pyarrow Table, the columns of ``dse export``."""
        from dse.spec import study_info
        from tracking.artifacts import pareto_table, trials_table

        make = pareto_table if front_only else trials_table
        return make(self.study.get_trials(deepcopy=False), study_info(self.spec, self.study_dir))


def _spec(spec: Spec | str | Path) -> Spec:
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, str) and "\n" in spec:
        return parse_spec(spec)
    return load_spec(spec)


def run(spec: Spec | str | Path, *, root: str | Path | None = None, **overrides: Any
        ) -> StudyResult:
    """Run (or continue) a study, as ``dse run`` does; returns it with its front.

    Args:
        spec: a :class:`~dse.spec.Spec`, a spec file path, or spec TOML text.
        root: the studies directory (default ``./dse-studies``, as ``--dir``).
        overrides: keyword arguments of :class:`dse.driver.Driver`: ``n_trials``,
            ``workers``, ``seed``, ``address``, ``tracking`` (``False`` = off), ``progress``.
            In a process where Ray is already initialised (``ray.init()`` in the notebook)
            the run uses that Ray, whatever ``address`` says, and logs one line saying so
            (a warning when ``address`` names another cluster; ``ray.shutdown()`` first to
            run there).

    Raises:
        dse.spec.SpecError: the spec is invalid (nothing is created).
        dse.driver.DriverError: the run failed (as ``dse run`` exit code 1).
    """
    from dse.driver import DEFAULT_DIR, Driver

    s = _spec(spec)
    driver = Driver(s, root if root is not None else DEFAULT_DIR, **overrides)
    summary = driver.run()
    res = load(s.name, root=root)
    res.summary = summary
    return res


def load(name: str, root: str | Path | None = None, storage: str | None = None) -> StudyResult:
    """Open an existing study by name (read-only use; ``dse resume`` continues it).

    ``storage``: the study's storage URL (``--storage``); the spec is then read from it,
    so no spec file is needed (:func:`dse.driver.load_study_spec`). A study whose stored
    spec today's evaluators reject (an option removed since) opens with one warning.

    Raises:
        FileNotFoundError / dse.spec.SpecError: no such study, or its spec is invalid
            even without the evaluator checks.
    """
    import optuna

    from dse.driver import DEFAULT_DIR, load_study_spec, study_dir, use_recorded_sampler
    from dse.storage import open_storage

    root = root if root is not None else DEFAULT_DIR
    spec = load_study_spec(name, root, storage, read_only=True)
    sdir = study_dir(name, root)
    study = optuna.load_study(study_name=name, storage=open_storage(spec.storage, sdir))
    use_recorded_sampler(study, spec, record=False)  # the sampler the study was started with
    return StudyResult(spec, study, sdir)
