"""An evaluator that a test holds at a chosen moment with files: plugin ``tests.gates:gate``.

ZDT1 (``f1``, ``f2`` of ``x.0``, ``x.1``), whose factory waits while the file
``build_gate`` exists and whose evaluations (after ``delay_s``) wait while the file
``gate`` exists. While it waits, it keeps a marker in ``<gate>.held/`` (one file per
waiting evaluation or build, named after its process and a count), so a test acts once
trials really are in flight or actors really are building, whatever the machine's speed.
Importable by the ``dse`` processes and Ray workers a test starts with ``PYTHONPATH`` at
the repository root; runs inline in the test process too.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from pathlib import Path
from typing import Any

from dse.schema import EvaluatorSchema, Metric, Option, Param, Plugin

POLL_S = 0.02
_count = itertools.count()


def hold(gate: str) -> None:
    """Wait while the file ``gate`` exists (``""``: no gate), with a marker in ``<gate>.held/``."""
    if not gate or not os.path.exists(gate):
        return
    held = Path(gate + ".held")
    held.mkdir(exist_ok=True)
    marker = held / f"{os.getpid()}-{next(_count)}"
    marker.touch()
    try:
        while os.path.exists(gate):
            time.sleep(POLL_S)
    finally:
        marker.unlink(missing_ok=True)


def held(gate: Path) -> int:
    """How many evaluations (or builds) wait at ``gate`` now."""
    d = Path(str(gate) + ".held")
    return len(list(d.iterdir())) if d.is_dir() else 0


class Gate:
    def __init__(self, options: dict[str, Any]) -> None:
        self.delay_s, self.gate = float(options["delay_s"]), str(options["gate"])
        hold(str(options["build_gate"]))

    def evaluate(self, params: Any, upstream: Any) -> dict[str, float]:
        time.sleep(self.delay_s)
        hold(self.gate)
        x0, x1 = params["x.0"], params["x.1"]
        g = 1 + 9 * x1
        return {"f1": x0, "f2": g * (1 - math.sqrt(x0 / g))}


gate = Plugin(
    EvaluatorSchema(
        "gate", "ZDT1 held while files exist (tests)",
        options=(Option("delay_s", "float", "seconds per evaluation before the gate", low=0.0, default=0.0),
                 Option("gate", "str", "while this file exists, evaluations do not end", default=""),
                 Option("build_gate", "str", "while this file exists, the factory does not return",
                        default=""),
                 Option("n_vars", "int", "variables (2)", low=2, default=2)),
        params=(Param("x.0", "float", "x0", low=0.0, high=1.0), Param("x.1", "float", "x1", low=0.0, high=1.0)),
        metrics=(Metric("f1", "x0"), Metric("f2", "ZDT1 f2")),
    ),
    lambda options, ctx: Gate(options),
)
