"""A resumed study continues its search: the sampler never replays its first draws."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from dse.cli import main
from dse.driver import open_study
from dse.plugins.benchmarks import study_spec
from dse.spec import parse_spec
from dse.storage import flush_storage, open_storage
from tests.kills import sigkill_when


def _ask_tell(study: optuna.Study, n: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(n):
        t = study.ask()
        x = (t.suggest_float("x.0", 0.0, 1.0), t.suggest_float("x.1", 0.0, 1.0))
        study.tell(t, list(x))
        out.append(x)
    return out


@pytest.mark.parametrize("sampler", ["random", "tpe", pytest.param("qmc", marks=pytest.mark.slow)])
def test_reopened_study_does_not_replay_its_draws(tmp_path: Path, sampler: str) -> None:
    """(NSGA-II children may copy a parent by design, so it is left out of this check.)"""
    spec = parse_spec(study_spec("s", n_trials=20, sampler=sampler, seed=5))
    first = _ask_tell(open_study(spec, tmp_path / "a"), 4)
    again = _ask_tell(open_study(spec, tmp_path / "b"), 4)
    assert first == again  # a fresh study: the seed reproduces the run
    resumed = _ask_tell(open_study(spec, tmp_path / "a", buffered=True), 4)  # a resume
    assert not set(resumed) & set(first), (first, resumed)
    # the resumed state is a function of (seed, trials so far): reproducible too
    study_b = open_study(spec, tmp_path / "b", buffered=True)
    assert _ask_tell(study_b, 4) == resumed
    flush_storage(study_b._storage)


@pytest.mark.slow
def test_three_sigkills_then_resume_repeat_no_parameters(ray_session: Any, tmp_path: Path) -> None:
    """Three drivers SIGKILLed (each joins the session's Ray cluster), then a resume."""
    n = 40
    spec = tmp_path / "r.toml"
    spec.write_text(study_spec("rk", n_trials=n, sampler="random", seed=3,
                               options={"delay_s": 0.1}, tracking={"enabled": False}))
    root = tmp_path / "studies"
    sigkill_when(["run", str(spec)], root, "rk", 5, join=ray_session)
    sigkill_when(["resume", "rk"], root, "rk", 14, join=ray_session)
    sigkill_when(["resume", "rk"], root, "rk", 24, join=ray_session)
    assert main(["resume", "rk", "--dir", str(root), "--progress", "log"]) == 0
    study = optuna.load_study(study_name="rk", storage=open_storage(None, root / "rk"))
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.COMPLETE] == n and states[TrialState.RUNNING] == 0
    # each kill left trials RUNNING; the resumes ran them again as themselves
    assert states[TrialState.FAIL] == 0 and len(study.trials) == n
    complete = [tuple(sorted(t.params.items())) for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(set(complete)) == n  # a continuous space: not one parameter set twice
