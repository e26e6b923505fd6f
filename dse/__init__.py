"""dse: distributed design-space exploration for ML hardware/software co-design.

`dse` composes the plain libraries (`quant`, `evaluators`, `simulators`) into searches:
study specs, the Optuna ask/tell driver over Ray actors, resume, and the CLI.
From Python: ``dse.run(spec_or_path, **overrides)`` and ``dse.load(name, root=...)``
return a :class:`dse.api.StudyResult` (``.study``, ``.front``, ``.table()``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dse.api import StudyResult
    from dse.spec import Spec

__version__ = "0.1.0"


def run(spec: Spec | str | Path, *, root: str | Path | None = None, **overrides: Any
        ) -> StudyResult:
    """Run (or continue) a study from a notebook; see :func:`dse.api.run`."""
    from dse.api import run as _run

    return _run(spec, root=root, **overrides)


def load(name: str, root: str | Path | None = None) -> StudyResult:
    """Open an existing study (its spec, Optuna study and front); see :func:`dse.api.load`."""
    from dse.api import load as _load

    return _load(name, root=root)

