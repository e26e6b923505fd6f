"""The local Ray cluster a driver starts listens on the loopback interface only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dse.plugins.benchmarks import study_spec

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


@pytest.mark.slow
def test_local_cluster_listens_on_loopback_only(tmp_path: Path) -> None:
    spec = tmp_path / "lo.toml"
    spec.write_text(study_spec("lo", n_trials=200, sampler="random", options={"delay_s": 0.2},
                               tracking={"enabled": False}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "dse.cli", "run", str(spec), "--dir",
                             str(tmp_path / "studies"), "--progress", "log"],
                            env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tree: list[psutil.Process] = []
    try:
        journal = tmp_path / "studies" / "lo" / "optuna.journal"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # actors are evaluating once trials are told
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            if journal.exists() and journal.read_bytes().count(b'"state":1') >= 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("driver made no progress")
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
        pids = {p.pid for p in tree}
        listening = [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids]
        names = {psutil.Process(pid).name() for pid, _, _ in listening}
    finally:
        for p in tree or [psutil.Process(proc.pid)]:  # the driver and every Ray process it started
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        proc.wait()
    # gcs_server, raylet, the driver, the actors and the agents all listen somewhere
    assert len(listening) >= 5 and {"gcs_server", "raylet"} <= names, listening
    assert all(ip in LOOPBACK for _, ip, _ in listening), listening
