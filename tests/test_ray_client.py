"""`dse run --address ray://HEAD:10001` (Ray Client) from a machine outside the cluster.

A one-node Ray cluster in a network namespace (``clusters/netns.py``: the head at
10.77.0.1, token authentication on, its Ray Client server on port 10001) and the driver in
a second namespace (10.77.0.2) that runs no Ray node: the only way in is Ray Client. The
study must complete with its actor on the head node, and the driver's output must carry
no Ray Client noise. Skipped, with the reason, where network namespaces cannot be made.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dse.plugins.benchmarks import study_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "clusters"))
import netns  # noqa: E402  (clusters/netns.py)

N_TRIALS = 4


@pytest.mark.slow
def test_ray_client_runs_a_study_from_outside_the_cluster(tmp_path: Path) -> None:
    if why := netns.unavailable():
        pytest.skip(why)
    spec = tmp_path / "rc.toml"
    spec.write_text(study_spec("rc", n_trials=N_TRIALS, sampler="random", problem="netns:zdt1_with_node",
                               workers=1, tracking={"enabled": False}))
    root = tmp_path / "studies"
    address = f"ray://{netns.SUBNET}.1:{netns.CLIENT_PORT}"
    with netns.TwoNodes(cpus=1, pythonpath=[ROOT / "clusters"], workers=False) as nodes:
        done = subprocess.run(
            nodes.worker.argv([sys.executable, "-m", "dse.cli", "run", str(spec), "--dir", str(root),
                               "--address", address, "--progress", "log"]),
            env=nodes.env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        server_logs = "" if done.returncode == 0 else " | ".join(  # the head's Ray Client server
            f"{p.name}: {p.read_text(errors='replace')[-1500:]}"
            for p in sorted(nodes.tmp.glob("*/session_latest/logs/ray_client_server*.err")))
    assert done.returncode == 0, done.stderr[-3000:] + server_logs
    assert done.stdout.splitlines()[-1].startswith(f"study rc: {N_TRIALS} COMPLETE, 0 FAIL"), done.stdout
    assert "SIGTERM handler" not in done.stderr + done.stdout  # the client server's own warning

    import optuna
    from optuna.trial import TrialState

    from dse.storage import open_storage

    trials = optuna.load_study(study_name="rc", storage=open_storage(None, root / "rc")).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * N_TRIALS
    # evaluated on the cluster's node, not in the driver's namespace
    assert {t.user_attrs["info"]["node_ip"] for t in trials} == {f"{netns.SUBNET}.1"}
