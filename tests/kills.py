"""Kill a real `dse` process at a chosen moment: shared by the crash-and-resume tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dse.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]


def states(root: Path, name: str) -> Counter[TrialState]:
    """Trial states of study ``name`` in ``root`` (journal storage); empty while it is created."""
    if not (root / name / "optuna.journal").exists():
        return Counter()
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(None, root / name))
    except KeyError:  # the study is being created
        return Counter()
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def sigkill_when(argv: list[str], root: Path, name: str, at_complete: int, *,
                 cwd: Path | None = None, timeout_s: float = 180) -> None:
    """Run ``dse argv --dir root --progress log`` in its own process group and SIGKILL the
    group once study ``name`` holds at least ``at_complete`` COMPLETE trials and one RUNNING
    (0: as soon as the first trial is asked). Fails the test if it ends or stalls first."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "dse.cli", *argv, "--dir", str(root), "--progress", "log"],
                            cwd=cwd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"dse {argv[0]} ended before the kill (rc {proc.returncode}): "
                            f"{proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            c = states(root, name)
            if c[TrialState.COMPLETE] >= at_complete and c[TrialState.RUNNING] >= 1:
                return
            time.sleep(0.05)
        pytest.fail(f"dse {argv[0]} made no progress")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
