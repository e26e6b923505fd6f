"""Kill or interrupt a real `dse` process at a chosen moment: shared by the crash-and-resume
and Ctrl-C tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from dse.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]


def states(root: Path, name: str, storage: str | None = None) -> Counter[TrialState]:
    """Trial states of study ``name`` in ``root`` (its journal storage, or the storage URL
    ``storage``); empty while it is created."""
    if storage is None and not (root / name / "optuna.journal").exists():
        return Counter()
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(storage, root / name))
    except KeyError:  # the study is being created
        return Counter()
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def mid_trial(root: Path, name: str, at_complete: int, storage: str | None = None
              ) -> Callable[[], bool]:
    """A condition for :meth:`Dse.wait_until`: study ``name`` (as :func:`states` reads it)
    holds at least ``at_complete`` COMPLETE trials and one RUNNING, so that a kill then
    leaves an orphan (a kill between one trial's tell and the next ask leaves none)."""
    def cond() -> bool:
        c = states(root, name, storage)
        return c[TrialState.COMPLETE] >= at_complete and c[TrialState.RUNNING] >= 1
    return cond


def sigkill_when(argv: list[str], root: Path, name: str, at_complete: int, *,
                 cwd: Path | None = None, timeout_s: float = 180, join: Any = None) -> None:
    """Run ``dse argv --dir root --progress log`` in its own process group and SIGKILL the
    group once study ``name`` holds at least ``at_complete`` COMPLETE trials and one RUNNING
    (0: as soon as the first trial is asked; :func:`mid_trial`). Fails the test if it ends
    or stalls first.

    ``join``: the ``ray_session`` fixture's ``ray``: the process joins that cluster
    (``--address``) instead of starting its own (seconds per start-up); the kill then ends
    the driver, its actors and its unfinished trials as before.
    """
    if join is not None:
        argv = [*argv, "--address", join.get_runtime_context().gcs_address]
    d = Dse([*argv, "--dir", str(root), "--progress", "log"], cwd=cwd, watch=False)
    try:
        d.wait_until(mid_trial(root, name, at_complete),
                     f"{at_complete} COMPLETE and one RUNNING", timeout_s, poll_s=0.05)
    finally:
        os.killpg(d.proc.pid, signal.SIGKILL)
        d.proc.wait()


class Dse:
    """``dse argv`` in its own process group, as a terminal runs it, with PYTHONPATH at the
    repository root. Its stdout and stderr lines are collected as they come, and every
    process below it (the MLflow logging process, Ray's processes, the reaper) is recorded
    every 20 ms, so that :meth:`end` can check that none outlives it; ``peak_rss_mb``: the
    largest summed RSS of it and them (sampled every 0.25 s; an upper bound, as
    bench/peak_rss.py). Reading the pipes as they fill, a chatty process never blocks on
    a full one."""

    def __init__(self, argv: list[str], cwd: Path | None = None, python: tuple[str, ...] = (),
                 env: Mapping[str, str] | None = None, watch: bool = True) -> None:
        """``python``: options of the interpreter (``-X importtime``); ``env``: added to
        the environment; ``watch``: record the processes below it (false: :meth:`end`
        checks none, and no psutil scan runs every 20 ms)."""
        import psutil

        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.proc = subprocess.Popen([sys.executable, *python, "-m", "dse.cli", *argv], cwd=cwd, env=env,
                                     start_new_session=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.tree: dict[int, psutil.Process] = {}
        self.peak_rss_mb = 0.0
        self._me = psutil.Process(self.proc.pid)
        self._threads = [threading.Thread(target=self._read, args=(f, lines), daemon=True)
                         for f, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        if watch:
            self._threads.append(threading.Thread(target=self._watch, daemon=True))
        for t in self._threads:
            t.start()

    def _read(self, f: object, lines: list[str]) -> None:
        for line in f:  # type: ignore[attr-defined]
            lines.append(line.rstrip("\n"))

    def _watch(self) -> None:
        import psutil

        k = 0
        while self.proc.poll() is None:
            try:
                below = self._me.children(recursive=True)
                for p in below:
                    self.tree.setdefault(p.pid, p)
                if k % 12 == 0:
                    rss = 0
                    for p in [self._me, *below]:
                        try:
                            rss += p.memory_info().rss
                        except psutil.Error:
                            pass
                    self.peak_rss_mb = max(self.peak_rss_mb, rss / 2**20)
            except psutil.Error:
                pass
            k += 1
            time.sleep(0.02)

    def said(self) -> list[str]:
        """dse's own log lines so far, without time and level (``"stopping: ..."``)."""
        return [ln.split(" dse: ", 1)[1] if " dse: " in ln else ln.split(" dse.tracking: ", 1)[-1]
                for ln in self.err]

    def wait_until(self, cond: Callable[[], bool], what: str, timeout_s: float = 180,
                   poll_s: float = 0.02) -> None:
        """Until ``cond()`` (asked every ``poll_s``); fails the test if the process ends
        first or it never comes."""
        deadline = time.monotonic() + timeout_s
        while not cond():
            if self.proc.poll() is not None:
                time.sleep(0.2)  # the last lines
                pytest.fail(f"dse ended (rc {self.proc.returncode}) before {what}:\n" + "\n".join(self.err[-30:]))
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} in {timeout_s:.0f} s:\n" + "\n".join(self.err[-30:]))
            time.sleep(poll_s)

    def press(self, wait_for: str | None = None) -> float:
        """Ctrl-C as a terminal sends it (SIGINT to the whole group); with ``wait_for``,
        until dse says a line holding it. Returns the time of the press (monotonic)."""
        t = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGINT)
        if wait_for is not None:
            n = len(self.err)
            self.wait_until(lambda: any(wait_for in ln for ln in self.err[n:]), repr(wait_for))
        return t

    def wait(self, timeout_s: float) -> int:
        """The exit code, once the process has ended and its last lines are read
        (``subprocess.TimeoutExpired`` after ``timeout_s``)."""
        rc = self.proc.wait(timeout=timeout_s)
        for t in self._threads:
            t.join(timeout=10)
        return rc

    def end(self, since: float, timeout_s: float = 60) -> tuple[int, float, float]:
        """Wait for the exit and for every recorded process to be gone (a zombie counts as
        gone: this machine's init may not reap orphans). Returns the exit code and the
        seconds from ``since`` to the exit and to the last process gone. Fails the test
        (killing the group) if either does not come within ``timeout_s``: a hang."""
        import psutil

        try:
            try:
                rc = self.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pytest.fail(f"dse still running {timeout_s:.0f} s after Ctrl-C:\n" + "\n".join(self.err[-30:]))
            exit_s = time.monotonic() - since

            def alive(p: psutil.Process) -> bool:
                try:
                    return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                except psutil.Error:
                    return False

            deadline = time.monotonic() + timeout_s
            while (left := [p for p in self.tree.values() if alive(p)]) and time.monotonic() < deadline:
                time.sleep(0.02)
            if left:
                names = [(p.pid, p.name()) for p in left]
                for p in left:
                    p.kill()
                pytest.fail(f"processes outlived dse: {names}")
            return rc, exit_s, time.monotonic() - since
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
