"""An edited spec on an existing study: refused with the differing fields unless
--allow-spec-change; run-control fields are accepted; spec.toml always holds the spec
the study runs with."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from dse.cli import main
from dse.driver import SPEC_ATTR, open_study, spec_changes
from dse.plugins.benchmarks import study_spec
from dse.spec import parse_spec

BASE = study_spec("ch", n_trials=3, sampler="random", seed=1, tracking={"enabled": False})


def _complete_study(root: Path) -> Path:
    """A study with its 3 COMPLETE trials (so `dse run` stops before starting Ray)."""
    study = open_study(parse_spec(BASE), root / "ch")
    for _ in range(3):
        t = study.ask()
        study.tell(t, [t.suggest_float("x.0", 0, 1), t.suggest_float("x.1", 0, 1)])
    return root / "ch"


def _run(tmp_path: Path, text: str, *flags: str) -> int:
    path = tmp_path / "edited.toml"
    path.write_text(text)
    return main(["run", str(path), "--dir", str(tmp_path / "studies"), *flags])


def test_field_diff() -> None:
    new = BASE.replace("seed = 1", "seed = 2").replace("high = 1.0 }", "high = 0.9 }", 1)
    assert spec_changes(BASE, new) == ["space.x.0.high", "study.seed"]
    assert spec_changes(BASE, "# a comment\n" + BASE.replace(" = ", "=")) == []
    assert spec_changes(BASE, BASE.replace('metric = "f2"', 'metric = "f1"\ndirection = "maximize"'))


def test_changed_spec_is_refused_with_its_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sdir = _complete_study(tmp_path / "studies")
    stored, journal = (sdir / "spec.toml").read_bytes(), (sdir / "optuna.journal").read_bytes()
    new = BASE.replace("seed = 1", "seed = 2").replace("high = 1.0 }", "high = 0.9 }", 1)
    assert _run(tmp_path, new) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == (f"{tmp_path / 'edited.toml'}: study 'ch' exists with another spec "
                      f"({sdir / 'spec.toml'}): space.x.0.high, study.seed differ; use another "
                      "study name, or --allow-spec-change to continue it with this spec")
    assert (sdir / "spec.toml").read_bytes() == stored
    assert (sdir / "optuna.journal").read_bytes() == journal
    # layout and comments are no change; the stored text stays
    assert _run(tmp_path, "# same study\n" + BASE.replace(" = ", "=")) == 0
    assert (sdir / "spec.toml").read_bytes() == stored


def test_run_control_change_is_accepted_and_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sdir = _complete_study(tmp_path / "studies")
    new = BASE.replace("n_trials = 3", "n_trials = 2").replace("workers = 2", "workers = 1")
    assert _run(tmp_path, new) == 0
    assert "is complete" in capsys.readouterr().out
    assert (sdir / "spec.toml").read_text() == new  # `dse resume` aims at the new target


def test_allow_spec_change_keeps_the_stored_spec_consistent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sdir = _complete_study(tmp_path / "studies")
    new = BASE.replace("seed = 1", "seed = 7")
    assert _run(tmp_path, new, "--allow-spec-change") == 0
    assert (sdir / "spec.toml").read_text() == new
    from dse.storage import open_storage

    stored = optuna.load_study(study_name="ch", storage=open_storage(None, sdir))
    assert stored.user_attrs[SPEC_ATTR] == new  # both copies, before any trial runs
    study = open_study(parse_spec(new), sdir)  # what the driver does next
    assert study.user_attrs[SPEC_ATTR] == new
    reread = optuna.load_study(study_name="ch", storage=study._storage)
    assert reread.user_attrs[SPEC_ATTR] == new
    capsys.readouterr()
    assert _run(tmp_path, new) == 0  # now the stored spec: no flag needed
    assert _run(tmp_path, BASE) == 2  # and the old one is the changed one
    assert "study.seed differ" in capsys.readouterr().err


def test_hand_edited_spec_toml_is_refused_by_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """spec.toml edited by hand: `dse resume` compares it with the spec the study's storage
    holds and refuses before anything runs (no Ray is started for this)."""
    root = tmp_path / "studies"
    sdir = _complete_study(root)
    journal = (sdir / "optuna.journal").read_bytes()
    (sdir / "spec.toml").write_text(BASE.replace("seed = 1", "seed = 5").replace("n_trials = 3", "n_trials = 6"))
    assert main(["resume", "ch", "--dir", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists with another spec (the study's dse:spec in its storage)" in err[0]
    assert "study.seed differ" in err[0] and "n_trials" not in err[0], err
    assert (sdir / "optuna.journal").read_bytes() == journal


@pytest.mark.parametrize("edit", [
    ('n_vars = 2 }', 'n_vars = 2, gain = 1.0 }'),  # an option zdt1 has since dropped
    ('name = "zdt1"', 'name = "retired_kind"'),  # an evaluator no longer installed
])
def test_study_whose_spec_no_longer_validates_opens_read_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
    edit: tuple[str, str],
) -> None:
    """load, status, pareto and export work on it with one warning; resume refuses it with
    the one-line error."""
    import logging

    import dse

    sdir = _complete_study(tmp_path / "studies")
    stored = (sdir / "spec.toml").read_text()
    assert edit[0] in stored
    (sdir / "spec.toml").write_text(stored.replace(edit[0], edit[1]))
    root = str(tmp_path / "studies")
    with caplog.at_level(logging.WARNING, logger="dse"):
        res = dse.load("ch", root=root)
        assert len(res.study.trials) == 3 and len(res.front) >= 1
        assert main(["status", "ch", "--dir", root]) == 0
        assert main(["pareto", "ch", "--dir", root]) == 0
        assert main(["export", "ch", "--dir", root, "--out", str(tmp_path / "t.parquet")]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 4 and len(set(warned)) == 1, warned
    assert warned[0].startswith(f"study ch: its spec no longer validates ({sdir / 'spec.toml'}: evaluators[0]")
    assert warned[0].endswith("opened read-only: status, pareto, export and sync work, run and resume refuse")
    out = capsys.readouterr().out
    assert "study ch: 3 COMPLETE" in out and "3 trials -> " in out
    assert main(["resume", "ch", "--dir", root]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evaluators[0]" in err[0], err
