"""``--storage URL`` on every command; the spec lives inside the study; URL checks.

PostgreSQL cases use the session's server (``postgres_server`` in conftest: the CI's
``$DSE_TEST_POSTGRES_URL`` or a private ``initdb``), skipped with the reason otherwise.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dse.cli import main
from dse.plugins.benchmarks import study_spec
from dse.storage import check_storage, open_storage, redact, storage_url


def _spec(tmp: Path, name: str, n_trials: int, storage: str | None = None) -> Path:
    text = study_spec(name, n_trials=n_trials, options={"delay_s": 0.0}, storage=storage,
                      tracking={"enabled": False})
    text = text.replace("[ray]\n", '[ray]\naddress = "inline"\n', 1)
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


def _states(url: str, name: str, sdir: Path) -> Counter[TrialState]:
    study = optuna.load_study(study_name=name, storage=open_storage(url, sdir))
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def test_postgresql_urls_use_psycopg3() -> None:
    assert storage_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert storage_url("postgres://u@h:5/db") == "postgresql+psycopg://u@h:5/db"
    assert storage_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert storage_url("sqlite:///x.db") == "sqlite:///x.db"
    assert redact("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"
    assert redact(None) == "journal:optuna.journal"


def test_validate_checks_driver_and_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # nothing listens on port 1; the password never shows
    why = check_storage("postgresql://u:secret@127.0.0.1:1/db", timeout_s=2)
    assert why is not None and "cannot connect" in why and "secret" not in why and "\n" not in why
    why = check_storage("mysql+pymysql://u@127.0.0.1/db")  # no pymysql installed here
    assert why is not None and "driver 'pymysql' is not installed" in why
    assert check_storage(str(tmp_path / "x.journal")) is None
    assert check_storage(f"sqlite:///{tmp_path / 'x.db'}") is None
    spec = _spec(tmp_path, "v", 3)
    assert main(["validate", str(spec), "--storage", "postgresql://u:secret@127.0.0.1:1/db"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dse validate: storage postgresql://u:***@127.0.0.1:1/db: ")
    assert main(["validate", str(spec), "--storage", f"sqlite:///{tmp_path / 'v.db'}"]) == 0
    assert "storage sqlite:///" in capsys.readouterr().out


def test_journal_storage_from_another_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A journal elsewhere (a shared file system): resume/status/export by name from a
    directory that has never seen the spec file."""
    journal = str(tmp_path / "shared" / "studies.journal")
    (tmp_path / "shared").mkdir()
    spec = _spec(tmp_path, "j", 4)
    assert main(["run", str(spec), "--dir", str(tmp_path / "A"), "--storage", journal]) == 0
    assert (tmp_path / "A" / "j" / "storage.url").read_text().strip() == journal
    assert not (tmp_path / "A" / "j" / "optuna.journal").exists()
    # host A, later: the local pointer finds the study without --storage
    assert main(["status", "j", "--dir", str(tmp_path / "A"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["states"]["COMPLETE"] == 4
    # host B: no spec file, another --dir
    assert main(["resume", "j", "--dir", str(tmp_path / "B"), "--storage", journal, "--n-trials", "7"]) == 0
    assert main(["export", "j", "--dir", str(tmp_path / "C"), "--storage", journal,
                 "--out", str(tmp_path / "t.csv")]) == 0
    assert "7 trials" in capsys.readouterr().out
    assert _states(journal, "j", tmp_path)[TrialState.COMPLETE] == 7
    assert main(["status", "nope", "--dir", str(tmp_path / "B"), "--storage", journal]) == 2
    assert "study 'nope': not in storage" in capsys.readouterr().err


@pytest.mark.slow
def test_every_command_on_postgresql(postgres_url: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    spec = _spec(tmp_path, "pg", 6)
    assert main(["run", str(spec), "--dir", str(tmp_path / "A"), "--storage", postgres_url]) == 0
    capsys.readouterr()
    # another machine: no spec file, another --dir; the spec comes from the study itself
    b = str(tmp_path / "B")
    assert main(["status", "pg", "--dir", b, "--storage", postgres_url, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["states"]["COMPLETE"] == 6 and st["n_trials"] == 6
    assert main(["resume", "pg", "--dir", b, "--storage", postgres_url, "--n-trials", "9"]) == 0
    assert main(["pareto", "pg", "--dir", b, "--storage", postgres_url, "--out", str(tmp_path / "f.csv")]) == 0
    assert main(["export", "pg", "--dir", b, "--storage", postgres_url, "--out", str(tmp_path / "t.parquet")]) == 0
    assert main(["sync", "pg", "--dir", b, "--storage", postgres_url]) == 0
    out = capsys.readouterr().out
    assert "9 trials -> " in out and "synced pg to sqlite:///" in out
    assert _states(postgres_url, "pg", tmp_path)[TrialState.COMPLETE] == 9
    # the run on host A left a pointer: resume there needs no --storage either
    assert main(["resume", "pg", "--dir", str(tmp_path / "A"), "--n-trials", "10"]) == 0
    assert _states(postgres_url, "pg", tmp_path) == Counter({TrialState.COMPLETE: 10})
    assert main(["status", "pg", "--dir", b, "--storage", postgres_url.rsplit("/", 1)[0] + "/nodb"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot connect" in err[0]
